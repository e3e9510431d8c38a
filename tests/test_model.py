"""The ConStruct model: output fields, trainable state, and the gradient paths of each loss."""

from __future__ import annotations

import pytest
import torch
from support import tiny_config

from construct.engine.objective import ConStructObjective
from construct.models.build import build_model, build_teacher


def objective_for(*overrides: str) -> ConStructObjective:
    config = tiny_config(*overrides)
    model = build_model(config)
    # Adapters start as the identity (zero last conv), which hides their inner layers from the
    # gradient; perturb that conv so every adapter parameter is on the path.
    for adapter in model.adapters.values():
        torch.nn.init.normal_(adapter.body[-1].weight, std=0.02)
    teacher = build_teacher(config) if config.loss.struct_weight > 0 else None
    return ConStructObjective(model, teacher, config).train()


def grads(module: torch.nn.Module) -> dict[str, float]:
    return {name: (0.0 if p.grad is None else float(p.grad.abs().sum())) for name, p in module.named_parameters()}


def assert_frozen_untouched(objective: ConStructObjective) -> None:
    assert all(not p.requires_grad and p.grad is None for p in objective.model.student.parameters())
    if objective.teacher is not None:
        assert all(not p.requires_grad and p.grad is None for p in objective.teacher.parameters())


def test_forward_fields_and_shapes(batch):
    images, _ = batch
    model = build_model(tiny_config("model.cam_levels=[1,2]", "model.cam_level_weights=[0.3,0.7]",
                                    "model.distill_pairs=[[2,2]]"))
    out = model(images)
    assert out.cams.shape == (3, 4, 8, 8)  # finest CAM level: 4x4 patch grid upsampled x2
    assert out.logits.shape == (3, 4)
    assert [lg.shape for lg in out.level_logits] == [(3, 4), (3, 4)]
    assert sorted(out.refined) == [1, 2]
    expected = (0.3 * out.level_logits[0] + 0.7 * out.level_logits[1]) / 1.0
    assert torch.allclose(out.logits, expected, atol=1e-6)


def test_prototypes_start_at_text_embeddings():
    from construct.models.conch import tokenize

    config = tiny_config("model.prototypes_per_class=2")
    model = build_model(config)
    with torch.no_grad():
        text = model.student.encode_text(tokenize([c.prompt for c in config.data.classes]))
    assert torch.allclose(model.prototypes()[0::2], text, atol=1e-5)
    assert torch.allclose(model.prototypes()[1::2], text, atol=1e-5)


def test_random_backbones_are_reproducible_from_the_seed():
    a = build_model(tiny_config())
    b = build_model(tiny_config())
    c = build_model(tiny_config("train.seed=7"))
    weights = [dict(m.student.named_parameters())["visual.trunk.patch_embed.proj.weight"] for m in (a, b, c)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_trainable_state_excludes_the_student_and_loads_strictly():
    model = build_model(tiny_config())
    state = model.trainable_state_dict()
    assert state and not any(key.startswith("student.") for key in state)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k
    )
    with pytest.raises(KeyError, match="missing: cam_scale"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != "cam_scale"})


def test_structural_loss_alone_trains_the_cam_adapters(batch):
    objective = objective_for("loss.cls_weight=0", "loss.sim_weight=0")
    losses = objective(*batch)
    assert set(losses) == {"struct", "total"}
    losses["total"].backward()
    adapter_grads = grads(objective.model.adapters)
    cam_level = str(objective.model.cam_levels[0])
    assert all(v > 0 for k, v in adapter_grads.items() if k.startswith(cam_level) and "body.1" not in k and "body.4" not in k)
    assert adapter_grads[f"{cam_level}.body.0.weight"] > 0
    assert_frozen_untouched(objective)


def test_similarity_loss_alone_trains_prototypes_and_cam_adapters(batch):
    objective = objective_for("loss.cls_weight=0", "loss.struct_weight=0")
    losses = objective(*batch)
    assert set(losses) == {"sim", "total"}
    losses["total"].backward()
    model = objective.model
    assert model.prototypes.prototypes.grad.abs().sum() > 0
    assert grads(model.adaptive_layer)["0.weight"] > 0
    assert grads(model.adapters)[f"{model.cam_levels[0]}.body.0.weight"] > 0
    assert_frozen_untouched(objective)


def test_zero_weight_terms_are_not_computed():
    objective = objective_for("loss.struct_weight=0", "loss.sim_weight=0")
    assert objective.teacher is None and objective.contrastive is None
