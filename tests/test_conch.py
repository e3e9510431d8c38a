"""CONCH wrapper: state-dict layout, strict loading, parity with the conch-fork reference, frozen behaviour."""

from __future__ import annotations

import ast
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file
from support import FIXTURES
from timm.layers import resample_abs_pos_embed
from torch import nn

from construct.errors import CheckpointError, ConfigError
from construct.models.conch import ConchModel, load_conch, tokenize

# conch-fork (the oracle) imports a deprecated timm path; not our code
pytestmark = pytest.mark.filterwarnings("ignore:Importing from timm.models.layers:FutureWarning")

POS = "visual.trunk.pos_embed"
TEXTS = [
    "Tumor (TUM) regions consist of malignant epithelial cells with pleomorphic, hyperchromatic nuclei.",
    "Necrosis (NEC) shows nuclear debris and “ghost” cell remnants.",
    "lymphocytes",
    "",
    "stroma " * 300,  # longer than the context: truncated
]


def fixture_shapes(name: str) -> dict[str, list[int]]:
    """key → shape entries of a key<TAB>shape fixture file (comments skipped)."""
    shapes = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = ast.literal_eval(shape)
    return shapes


# --- state-dict layout and loading -----------------------------------------------------------


def test_state_dict_matches_reference_layout() -> None:
    reference = {
        k: v
        for k, v in fixture_shapes("conch_state_dict_keys.txt").items()
        if k.startswith(("visual.", "text.")) or k == "logit_scale"
    }
    with torch.device("meta"):  # shapes only: skip 200M random initialisations
        model = ConchModel("vit_b16", image_size=448)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference
    assert model.embed_dim == 512 and model.trunk_width == 768


def test_bad_preset_and_image_size() -> None:
    with pytest.raises(ConfigError, match="preset"):
        load_conch(None, preset="vit_huge")
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_conch(None, image_size=200, preset="tiny")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """State dict of a random tiny model built for the checkpoint's 448 px grid."""
    torch.manual_seed(1)
    return dict(load_conch(None, image_size=448, preset="tiny").state_dict())


def test_load_resamples_pos_embed_and_ignores_text_decoder(tiny_state, tmp_path) -> None:
    path = tmp_path / "conch.bin"
    torch.save({**tiny_state, "text_decoder.x": torch.zeros(3)}, path)
    model = load_conch(str(path), image_size=224, preset="tiny")
    loaded = model.state_dict()
    expected_pos = resample_abs_pos_embed(
        tiny_state[POS], new_size=[14, 14], num_prefix_tokens=1, interpolation="bilinear", antialias=False
    )
    assert loaded[POS].shape == (1, 14 * 14 + 1, 192)
    assert torch.equal(loaded[POS], expected_pos)
    assert torch.equal(loaded[POS][:, 0], tiny_state[POS][:, 0])  # class token kept
    # timm's default (bicubic, antialiased) would give other values: the mode matters
    assert not torch.allclose(loaded[POS], resample_abs_pos_embed(tiny_state[POS], new_size=[14, 14]))
    assert all(torch.equal(v, tiny_state[k]) for k, v in loaded.items() if k != POS)
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(b.device.type == "cpu" for b in model.buffers())
    with torch.no_grad():  # non-persistent buffers (normalisation, causal mask) are usable
        assert model.encode_text(tokenize(["a"])).isfinite().all()
        assert model.encode_image(torch.rand(1, 3, 32, 32)).isfinite().all()

    same_grid = load_conch(str(path), image_size=448, preset="tiny").state_dict()
    assert all(torch.equal(v, tiny_state[k]) for k, v in same_grid.items())


def test_load_safetensors(tiny_state, tmp_path) -> None:
    path = tmp_path / "conch.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    loaded = load_conch(str(path), image_size=448, preset="tiny").state_dict()
    assert all(torch.equal(v, tiny_state[k]) for k, v in loaded.items())


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("missing", "visual.ln_contrast.bias"),
        ("extra", "visual.head.weight"),
        ("shape", "text.cls_emb"),
        ("shape", POS),  # 50 tokens: no class token + square grid, so not resampled
    ],
)
def test_load_rejects_mismatch(tiny_state, tmp_path, change: str, key: str) -> None:
    state = dict(tiny_state)
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key] = torch.zeros(2)
    elif key == POS:
        state[key] = torch.zeros(1, 51, 192)
    else:
        state[key] = torch.zeros(7)
    path = tmp_path / "conch.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(key)) as info:
        load_conch(str(path), image_size=224, preset="tiny")
    assert "\n" not in str(info.value)


def test_load_mismatch_message_is_truncated(tiny_state, tmp_path) -> None:
    path = tmp_path / "conch.bin"
    torch.save({k: v for k, v in tiny_state.items() if not k.startswith("text.")}, path)
    with pytest.raises(CheckpointError, match=r"missing: text\..*\(\+\d+ more\)") as info:
        load_conch(str(path), preset="tiny")
    assert len(str(info.value)) < 600


def test_missing_or_unreadable_checkpoint(tmp_path) -> None:
    missing = tmp_path / "nowhere.bin"
    with pytest.raises(CheckpointError) as info:
        load_conch(str(missing))
    message = str(info.value)
    assert str(missing) in message and "MahmoodLab/conch" in message
    assert "pretrained_models/conch/pytorch_model.bin" in message

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_conch(str(garbage), preset="tiny")


def test_missing_tokenizer_file(tmp_path) -> None:
    path = tmp_path / "tok.json"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        tokenize(["a"], str(path))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_conch(None, preset="tiny", tokenizer_path=str(path))


# --- parity with the conch-fork reference (test oracle only) ----------------------------------


def _ref_pixels(images: torch.Tensor) -> torch.Tensor:
    """The reference takes pixels already normalised with its own constants."""
    from conch.open_clip_custom import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Random reference CoCa (448 px config), its visual tower rebuilt for 224 px the way the reference
    loads a checkpoint at another size, and our models loaded from the reference's weights."""
    import importlib.resources

    from conch.open_clip_custom import coca_model

    config_file = importlib.resources.files("conch") / "open_clip_custom" / "model_configs" / "conch_ViT-B-16.json"
    cfg = json.loads(config_file.read_text())
    cfg.pop("custom_text")
    torch.manual_seed(0)
    ref = coca_model.CoCa(**cfg).eval()
    ref_state = ref.state_dict()

    # The reference's own 224 px path: build the tower at 224, resize_pos_embed, load.
    ref_visual_224 = coca_model._build_vision_tower(
        embed_dim=cfg["embed_dim"],
        vision_cfg={**cfg["vision_cfg"], "image_size": 224},
        embed_dim_caption=cfg["embed_dim_caption"],
    )
    holder = nn.Module()
    holder.visual = ref_visual_224
    visual_state = {k: v for k, v in ref_state.items() if k.startswith("visual.")}
    coca_model.resize_pos_embed(visual_state, holder)
    holder.load_state_dict(visual_state, strict=True)
    holder.eval()

    # What the public file holds, plus a few text_decoder keys our loader must skip.
    ckpt = {k: v for k, v in ref_state.items() if not k.startswith("text_decoder.")}
    ckpt.update({k: v for k, v in ref_state.items() if k.startswith("text_decoder.") and v.numel() < 4096})
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(ckpt, path)
    del ref_state, visual_state, ckpt
    ours_448 = load_conch(str(path), image_size=448)
    ours_224 = load_conch(str(path), image_size=224)
    path.unlink()
    yield {"ref": ref, "ref_visual_224": ref_visual_224, "ours_448": ours_448, "ours_224": ours_224}
    del ref, ref_visual_224, ours_448, ours_224, holder


@torch.no_grad()
def test_parity_image_448(parity) -> None:
    torch.manual_seed(2)
    images = torch.rand(1, 3, 448, 448)
    expected = parity["ref"].encode_image(_ref_pixels(images), normalize=True, proj_contrast=True)
    ours = parity["ours_448"].encode_image(images)
    assert ours.shape == (1, 512)
    assert (ours - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_parity_image_and_blocks_224(parity) -> None:
    torch.manual_seed(3)
    images = torch.rand(2, 3, 224, 224)
    ref, ref_visual = parity["ref"], parity["ref_visual_224"]
    blocks = (2, 5, 8, 11)
    captured = {}
    hooks = [
        ref_visual.trunk.blocks[b].register_forward_hook(lambda _m, _i, out, b=b: captured.__setitem__(b, out))
        for b in blocks
    ]
    full_visual = ref.visual
    ref.visual = ref_visual  # run the reference's own encode_image entry point at 224 px
    try:
        expected = ref.encode_image(_ref_pixels(images), normalize=True, proj_contrast=True)
    finally:
        ref.visual = full_visual
        for hook in hooks:
            hook.remove()

    ours = parity["ours_224"]
    assert (ours.encode_image(images) - expected).abs().max().item() <= 1e-5
    grids = ours.block_features(images, blocks=blocks)
    for b, grid in zip(blocks, grids):
        assert grid.shape == (2, 768, 14, 14)
        ref_grid = captured[b][:, 1:].reshape(2, 14, 14, 768).permute(0, 3, 1, 2)
        assert (grid - ref_grid).abs().max().item() <= 1e-5


@torch.no_grad()
def test_parity_text(parity) -> None:
    from conch.open_clip_custom import get_tokenizer
    from conch.open_clip_custom import tokenize as ref_tokenize

    ids = tokenize(TEXTS)
    assert ids.shape == (len(TEXTS), 128) and ids.dtype == torch.long
    assert tokenize([]).shape == (0, 128)
    assert torch.equal(ids, ref_tokenize(get_tokenizer(), TEXTS))
    ref, ours = parity["ref"], parity["ours_448"]
    assert ours.text.pad_id == ref.text.pad_id
    some = ids[[1, 4]]  # a padded and a truncated text keep the (slow, 12-layer) forward short
    expected = ref.encode_text(some, normalize=True)
    assert (ours.encode_text(some) - expected).abs().max().item() <= 1e-5


# --- tiny preset: shapes and frozen behaviour -------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> ConchModel:
    torch.manual_seed(0)
    return load_conch(None, image_size=224, preset="tiny")


def test_tiny_shapes(tiny) -> None:
    assert tiny.embed_dim == 512 and tiny.trunk_width == 192
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        emb = tiny.encode_image(images)
        text = tiny.encode_text(tiny.tokenize(TEXTS[:3]))
        grids = tiny.block_features(images, blocks=(0, 1, 2, 3))
        odd = tiny.block_features(torch.rand(1, 3, 160, 96), blocks=(3, 1))
    assert emb.shape == (2, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert text.shape == (3, 512) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    assert [g.shape for g in grids] == [(2, 192, 14, 14)] * 4
    assert [g.shape for g in odd] == [(1, 192, 10, 6)] * 2


def test_block_features_stop_after_last_block(tiny) -> None:
    calls = []
    blocks = tiny.visual.trunk.blocks
    hooks = [blk.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            tiny.block_features(torch.rand(1, 3, 64, 64), blocks=(1,))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]
    with pytest.raises(ValueError, match="blocks"):
        tiny.block_features(torch.rand(1, 3, 64, 64))  # default (2, 5, 8, 11) is beyond tiny's 4 blocks


def test_tiny_frozen_and_eval(tiny) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    nn.Sequential(tiny).train()
    assert not any(m.training for m in tiny.modules())


def test_gradient_reaches_images_not_weights(tiny) -> None:
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    target = torch.randn(2, 512)
    (tiny.encode_image(images) * target).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())

