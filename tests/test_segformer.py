"""Frozen MiT teacher: shapes, freezing, and strict loading of HF / NVlabs / mmseg checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from construct.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from construct.errors import CheckpointError  # noqa: E402
from construct.models.segformer import (  # noqa: E402
    MiTTeacher,
    load_mit_teacher,
    mit_config,
    to_nvlabs_state_dict,
)

# The NVlabs names that method.md §3 and users' files rely on.
NVLABS_EXAMPLE_KEYS = [
    "patch_embed1.proj.weight", "patch_embed1.norm.weight", "block1.0.norm1.weight", "block1.0.attn.q.weight",
    "block1.0.attn.kv.weight", "block1.0.attn.proj.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.weight",
    "block1.0.norm2.weight", "block1.0.mlp.fc1.weight", "block1.0.mlp.dwconv.dwconv.weight",
    "block1.0.mlp.fc2.weight", "norm1.weight",
]


@pytest.fixture(scope="module")
def mit_b1() -> MiTTeacher:
    torch.manual_seed(0)
    return load_mit_teacher(None, preset="mit_b1")


def _random_tiny(seed: int = 0) -> MiTTeacher:
    """Tiny teacher with every parameter perturbed, so swapped LayerNorms or biases change outputs."""
    torch.manual_seed(seed)
    teacher = load_mit_teacher(None, preset="tiny")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return teacher


def _images(size: int = 64) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_same_outputs(a: MiTTeacher, b: MiTTeacher) -> None:
    images = _images()
    for x, y in zip(a(images), b(images), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _save_nvlabs(teacher: MiTTeacher, path: Path) -> dict[str, torch.Tensor]:
    state = to_nvlabs_state_dict(teacher)
    torch.save({**state, "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}, path)
    return state


def test_stage_shapes_at_224():
    teacher = load_mit_teacher(None, preset="tiny")
    assert teacher.stage_channels == (16, 32, 48, 64)
    feats = teacher(torch.rand(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 56, 56), (2, 32, 28, 28), (2, 48, 14, 14), (2, 64, 7, 7)]


def test_frozen_and_always_eval():
    teacher = load_mit_teacher(None, preset="tiny")
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    images = _images().requires_grad_(True)
    first, second = teacher(images), teacher(images)
    assert all(f.grad_fn is None and not f.requires_grad for f in first)
    # The tiny preset has non-zero stochastic depth rates: equal outputs mean it is off.
    for x, y in zip(first, second, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_mit_b1_parameter_count(mit_b1):
    assert mit_b1.stage_channels == (64, 128, 320, 512)
    assert sum(p.numel() for p in mit_b1.parameters()) == 13_151_424


def test_mit_b1_nvlabs_key_names(mit_b1):
    state = to_nvlabs_state_dict(mit_b1)
    assert set(NVLABS_EXAMPLE_KEYS) <= state.keys()
    # 4 stages × (patch embed 4 + final norm 2); blocks 20 tensors with spatial reduction, 16 without.
    assert len(state) == 4 * 6 + 3 * 2 * 20 + 2 * 16
    assert sum(v.numel() for v in state.values()) == 13_151_424
    assert state["patch_embed1.proj.weight"].shape == (64, 3, 7, 7)
    assert state["block1.0.attn.kv.weight"].shape == (128, 64)
    assert state["block4.1.mlp.fc1.weight"].shape == (2048, 512)
    assert "block4.0.attn.sr.weight" not in state


def _nvlabs_reference(state: dict[str, torch.Tensor], preset: str, images: torch.Tensor) -> list[torch.Tensor]:
    """Functional port of NVlabs ``MixVisionTransformer.forward_features`` (eval mode)."""
    cfg = mit_config(preset)
    eps = 1e-5  # NVlabs uses 1e-6 in block/stage norms; transformers uses 1e-5 everywhere

    def w(name):
        return state[name + ".weight"], state[name + ".bias"]

    x = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    batch, outs = x.shape[0], []
    for s in range(4):
        dim, heads, sr = cfg.hidden_sizes[s], cfg.num_attention_heads[s], cfg.sr_ratios[s]
        x = F.conv2d(x, *w(f"patch_embed{s + 1}.proj"), stride=cfg.strides[s], padding=cfg.patch_sizes[s] // 2)
        height, width = x.shape[2:]
        x = F.layer_norm(x.flatten(2).transpose(1, 2), (dim,), *w(f"patch_embed{s + 1}.norm"), eps=eps)
        for j in range(cfg.depths[s]):
            b = f"block{s + 1}.{j}."
            h = F.layer_norm(x, (dim,), *w(b + "norm1"), eps=eps)
            q = F.linear(h, *w(b + "attn.q")).reshape(batch, -1, heads, dim // heads).permute(0, 2, 1, 3)
            if sr > 1:
                h = F.conv2d(h.transpose(1, 2).reshape(batch, dim, height, width), *w(b + "attn.sr"), stride=sr)
                h = F.layer_norm(h.flatten(2).transpose(1, 2), (dim,), *w(b + "attn.norm"), eps=eps)
            kv = F.linear(h, *w(b + "attn.kv")).reshape(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1) * (dim // heads) ** -0.5).softmax(-1)
            x = x + F.linear((attn @ kv[1]).transpose(1, 2).reshape(batch, -1, dim), *w(b + "attn.proj"))
            h = F.linear(F.layer_norm(x, (dim,), *w(b + "norm2"), eps=eps), *w(b + "mlp.fc1"))
            hidden = h.shape[-1]
            h = F.conv2d(h.transpose(1, 2).reshape(batch, hidden, height, width), *w(b + "mlp.dwconv.dwconv"),
                         padding=1, groups=hidden)
            x = x + F.linear(F.gelu(h.flatten(2).transpose(1, 2)), *w(b + "mlp.fc2"))
        x = F.layer_norm(x, (dim,), *w(f"norm{s + 1}"), eps=eps)
        x = x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def test_key_map_matches_nvlabs_forward():
    teacher = _random_tiny()
    images = _images()
    expected = _nvlabs_reference(to_nvlabs_state_dict(teacher), "tiny", images)
    for x, y in zip(teacher(images), expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_nvlabs_round_trip(tmp_path):
    source = _random_tiny()
    _save_nvlabs(source, tmp_path / "mit.pth")
    _assert_same_outputs(source, load_mit_teacher(tmp_path / "mit.pth", preset="tiny"))


def test_mmseg_round_trip(tmp_path):
    source = _random_tiny()
    state = {"backbone." + k: v for k, v in to_nvlabs_state_dict(source).items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(5, 256, 1, 1)
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, tmp_path / "mmseg.pth")
    _assert_same_outputs(source, load_mit_teacher(str(tmp_path / "mmseg.pth"), preset="tiny"))


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_hf_folder_round_trip(tmp_path, weights_name):
    source = _random_tiny()
    mit_config("tiny").to_json_file(str(tmp_path / "config.json"))
    state = {"segformer." + k: v.contiguous() for k, v in source.segformer.state_dict().items()}
    state |= {"classifier.weight": torch.zeros(1000, 64), "classifier.bias": torch.zeros(1000)}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(tmp_path / weights_name))
    else:
        torch.save(state, tmp_path / weights_name)
    _assert_same_outputs(source, load_mit_teacher(tmp_path, preset="tiny"))


def test_hf_folder_of_another_architecture(tmp_path):
    mit_config("tiny").to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="hidden_sizes"):
        load_mit_teacher(tmp_path, preset="mit_b1")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda s: s.pop("block2.0.attn.kv.weight"), "block2.0.attn.kv.weight"),
        (lambda s: s.__setitem__("block1.0.attn.extra.weight", torch.zeros(3)), "block1.0.attn.extra.weight"),
        (lambda s: s.__setitem__("norm3.weight", torch.zeros(7)), "norm3.weight"),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
def test_mismatched_nvlabs_keys_raise(tmp_path, edit, key):
    state = to_nvlabs_state_dict(load_mit_teacher(None, preset="tiny"))
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_mit_teacher(tmp_path / "bad.pth", preset="tiny")


def test_mismatched_hf_key_raises(tmp_path):
    state = load_mit_teacher(None, preset="tiny").segformer.state_dict()
    del state["encoder.block.0.0.mlp.dense1.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.block\.0\.0\.mlp\.dense1\.weight"):
        load_mit_teacher(tmp_path / "pytorch_model.bin", preset="tiny")


def test_missing_path_gives_download_hint(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_mit_teacher(tmp_path / "pretrained_models" / "mit_b1.pth")
    message = str(info.value)
    for hint in ("does not exist", "nvidia/mit-b1", "mit_b1.pth", "pretrained_models/mit_b1/"):
        assert hint in message


def test_hf_folder_without_weights(tmp_path):
    mit_config("tiny").to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_mit_teacher(tmp_path, preset="tiny")
