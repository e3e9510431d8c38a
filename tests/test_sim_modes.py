"""The switches of L_sim: token views, image-view resolution, pair cap, gradient path, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import DEMO_RANDOM, tiny_config

from construct.config import load_config
from construct.engine.objective import ConStructObjective
from construct.errors import ConfigError
from construct.losses import FgBgContrastiveLoss, info_nce
from construct.models.build import build_model
from construct.models.conch import load_conch


def sim_objective(*overrides: str) -> ConStructObjective:
    config = tiny_config("loss.struct_weight=0", "loss.cls_weight=0", *overrides)
    model = build_model(config)
    for adapter in model.adapters.values():  # leave the identity start so every adapter weight is on the path
        torch.nn.init.normal_(adapter.body[-1].weight, std=0.02)
    return ConStructObjective(model, None, config).train()


def trainable_grads(objective: ConStructObjective) -> dict[str, float]:
    return {name: float(p.grad.abs().sum()) if p.grad is not None else 0.0
            for name, p in objective.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("views", ["tokens", "image"])
def test_sim_alone_trains_adapters_and_prototypes(batch, views):
    objective = sim_objective(f"loss.sim_views={views}")
    objective(*batch)["total"].backward()
    grads = trainable_grads(objective)
    for name in ("prototypes.prototypes", "adapters.2.body.0.weight", "adapters.2.body.3.weight", "adapters.2.body.6.weight",
                 "adaptive_layer.0.weight", "cam_scale"):
        assert grads[name] > 0, name
    assert all(p.grad is None for p in objective.model.student.parameters())


def test_prototype_gradient_mode_leaves_the_cam_path_alone(batch):
    for views in ("tokens", "image"):
        objective = sim_objective(f"loss.sim_views={views}", "loss.sim_gradient=prototypes")
        objective(*batch)["total"].backward()
        grads = trainable_grads(objective)
        assert grads["prototypes.prototypes"] > 0
        assert grads["adapters.2.body.6.weight"] == 0 and grads["cam_scale"] == 0


def test_token_views_need_no_second_trunk_pass(batch, monkeypatch):
    objective = sim_objective("loss.sim_views=tokens")
    calls = []
    conch = objective.model.student
    monkeypatch.setattr(conch, "encode_image", lambda *a, **k: calls.append("encode_image"))
    original = conch.visual.trunk.forward_intermediates
    monkeypatch.setattr(conch.visual.trunk, "forward_intermediates",
                        lambda *a, **k: calls.append("trunk") or original(*a, **k))
    objective(*batch)
    assert calls == ["trunk"]


def test_weighted_token_pooling_ignores_zero_weight_tokens():
    torch.manual_seed(0)
    conch = load_conch(None, image_size=64, preset="tiny")
    _, tokens = conch.block_features_and_tokens(torch.rand(2, 3, 64, 64), blocks=(3,))
    kept = torch.tensor([0, 2, 5, 11])
    weights = torch.zeros(2, tokens.shape[1] - 1)
    weights[:, kept] = 1.0
    subset = torch.cat([tokens[:, :1], tokens[:, 1:][:, kept]], dim=1)
    expected = conch.encode_weighted_tokens(subset, torch.ones(2, kept.numel()))
    assert torch.allclose(conch.encode_weighted_tokens(tokens, weights), expected, atol=1e-4)
    # uniform weights over all patches: exactly open_clip's pooler on the patch tokens
    uniform = conch.encode_weighted_tokens(tokens, torch.ones(2, tokens.shape[1] - 1))
    reference = conch.visual.ln_contrast(conch.visual.attn_pool_contrast(tokens[:, 1:])[:, 0]) @ conch.visual.proj_contrast
    assert torch.allclose(uniform, F.normalize(reference, dim=-1), atol=1e-5)


class RecordingEncoder:
    """Records the views the image encoder receives; a differentiable stand-in for CONCH."""

    def __init__(self, dim: int = 8) -> None:
        self.projection = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
        self.shapes: list[tuple[int, ...]] = []

    def encode_image(self, views: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(views.shape))
        return F.normalize(views.mean(dim=(2, 3)) @ self.projection, dim=-1)


def test_image_views_at_a_lower_resolution():
    encoder = RecordingEncoder()
    loss = FgBgContrastiveLoss(0.5, "per_class", 0.07, 0, 8, views="image", view_size=32)
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    loss(torch.rand(1, 3, 64, 64), torch.randn(1, 3, 4, 4), labels, F.normalize(torch.randn(3, 8), dim=-1), 1, encoder)
    assert encoder.shapes == [(4, 3, 32, 32)]  # 2 pairs × (FG, BG)


def test_pair_cap_draws_pairs_uniformly():
    loss = FgBgContrastiveLoss(0.5, "per_class", 0.07, 0, 8, max_pairs=2)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # 4 pairs
    torch.manual_seed(0)
    counts = torch.zeros(2, 3)
    for _ in range(2000):
        batch_idx, class_idx = loss.pairs(labels)
        assert batch_idx.numel() == 2 and labels[batch_idx, class_idx].all()
        counts[batch_idx, class_idx] += 1
    share = counts[labels.bool()] / 2000
    assert torch.allclose(share, torch.full((4,), 0.5), atol=0.04)  # each pair drawn with probability 2/4
    assert FgBgContrastiveLoss(0.5, "per_class", 0.07, 0, 8).pairs(labels)[0].numel() == 4


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    conch = load_conch(None, image_size=32, preset="tiny")
    images = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    prototypes = F.normalize(torch.randn(3, 512), dim=-1)
    results = []
    for chunk in (0, 3):
        cams = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        loss = FgBgContrastiveLoss(0.5, "per_class", 0.07, 0, 512, views="image", checkpoint_chunk=chunk).train()
        value = loss(images, cams, labels, prototypes, 1, conch)
        value.backward()
        results.append((value.detach(), cams.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


@pytest.mark.parametrize("override, key", [
    ("loss.sim_views=crops", "loss.sim_views"),
    ("loss.sim_gradient=everything", "loss.sim_gradient"),
    ("loss.sim_view_size=112", "loss.sim_view_size"),  # token views have no view size
    ("loss.sim_max_pairs=-1", "loss.sim_max_pairs"),
    ("loss.sim_view_size=0", "loss.sim_view_size"),
])
def test_bad_sim_settings_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_RANDOM, ["loss.sim_views=tokens", override])
    message = str(error.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("views", ["tokens", "image"])
def test_an_empty_view_is_left_out_of_its_term(views):
    """A class whose FG mask covers the whole tile leaves nothing for its BG view: only L_fg counts."""
    torch.manual_seed(0)
    conch = load_conch(None, image_size=32, preset="tiny")
    images, labels = torch.rand(1, 3, 32, 32), torch.tensor([[1.0, 0.0, 0.0]])
    cams = torch.ones(1, 3, 2, 2)  # flat CAM: FG everywhere, soft weight 1 everywhere
    prototypes = F.normalize(torch.randn(3, 512), dim=-1)
    loss = FgBgContrastiveLoss(0.5, "per_class", 0.07, 8, 512, views=views).train()
    _, tokens = conch.block_features_and_tokens(images, blocks=(3,))
    fg_emb, _, _, non_empty = loss.embed(images, cams, labels, conch, tokens)
    assert non_empty.tolist() == [[True], [False]]
    value = loss(images, cams, labels, prototypes, 1, conch, tokens)
    expected = info_nce(fg_emb, prototypes[None, :1], prototypes[None, 1:], 0.07)
    assert torch.allclose(value, expected, atol=1e-6)
    assert int(loss.bank.count) == 0  # no BG embedding to remember


def test_checkpointing_needs_the_encoder_gradient():
    with pytest.raises(ConfigError, match="loss.sim_checkpoint_chunk"):
        load_config(DEMO_RANDOM, ["loss.sim_views=image", "loss.sim_gradient=prototypes", "loss.sim_checkpoint_chunk=4"])
