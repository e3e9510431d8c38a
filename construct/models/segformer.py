"""Frozen SegFormer MiT teacher (docs: method.md §3).

Built on transformers' ``SegformerModel`` (encoder only). Weights load strictly from a Hugging Face
folder (e.g. ``nvidia/mit-b1``), the NVlabs ImageNet ``mit_b1.pth`` or an mmseg checkpoint; the
NVlabs layout is translated with an explicit key map.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerModel

from construct.checkpoint import read_weight_file
from construct.constants import IMAGENET_MEAN, IMAGENET_STD
from construct.errors import CheckpointError, ConfigError
from construct.models.graphs import FrozenGraphs

_ARCH_FIELDS = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios")
_PRESETS: dict[str, dict[str, list[int]]] = {
    "mit_b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    # The other sizes of the SegFormer paper (Xie et al. 2021, Table 6), for the stage-2 segmenter.
    "mit_b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    "mit_b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    "mit_b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    "mit_b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    "mit_b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], num_attention_heads=[1, 2, 5, 8],
                   sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
    "tiny": dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                 sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4]),
}
_WEIGHTS_HINT = (
    "get the Hugging Face folder nvidia/mit-b1 (config.json + model.safetensors) and put it at "
    "pretrained_models/mit_b1/, or the NVlabs SegFormer ImageNet file mit_b1.pth and put it at "
    "pretrained_models/mit_b1.pth"
)

# NVlabs block sub-module -> transformers SegformerLayer sub-module. The fused ``attn.kv`` has no
# single counterpart: it is split into attention.self.key / attention.self.value.
_BLOCK_MAP = {
    "norm1": "layer_norm_1",
    "attn.q": "attention.self.query",
    "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm",
    "attn.proj": "attention.output.dense",
    "norm2": "layer_norm_2",
    "mlp.fc1": "mlp.dense1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.dense2",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}
_NV_KEY = re.compile(r"^(?:patch_embed(\d+)\.(proj|norm)|norm(\d+)|block(\d+)\.(\d+)\.(.+))\.(weight|bias)$")
_HF_KEY = re.compile(r"^encoder\.(?:patch_embeddings\.(\d+)\.(proj|layer_norm)|layer_norm\.(\d+)"
                     r"|block\.(\d+)\.(\d+)\.(.+))\.(weight|bias)$")


def mit_config(preset: str = "mit_b1") -> SegformerConfig:
    """The ``SegformerConfig`` of a preset (``mit_b0`` ... ``mit_b5`` or ``tiny``)."""
    if preset not in _PRESETS:
        raise ConfigError(f"unknown MiT preset {preset!r}; choose one of {sorted(_PRESETS)}")
    return SegformerConfig(num_encoder_blocks=4, **_PRESETS[preset])


class MiTTeacher(nn.Module):
    """Frozen MiT encoder: [0,1] RGB images -> the 4 stage feature maps (strides 4, 8, 16, 32).

    Always in eval mode, unless ``stochastic_depth``: then it follows ``train()``/``eval()`` like any
    module and starts in train mode, so its drop-path (config.drop_path_rate) is active in training,
    as in the released code (``model.teacher.mode: train``).
    """

    def __init__(self, config: SegformerConfig, stochastic_depth: bool = False) -> None:
        super().__init__()
        self.stochastic_depth = stochastic_depth
        self.segformer = SegformerModel(config)
        self.stage_channels: tuple[int, ...] = tuple(config.hidden_sizes)
        # Non-persistent: they follow .to(device) but keep state_dict() in the HF "segformer." layout.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.graphs: FrozenGraphs | None = None
        """Set by :func:`~construct.models.graphs.enable_fast_path`: passes on CUDA replay graphs."""
        self.requires_grad_(False)
        self.train(stochastic_depth)

    def train(self, mode: bool = True) -> MiTTeacher:
        """Without ``stochastic_depth``, ignore ``mode``: the teacher stays deterministic (eval mode)."""
        return super().train(mode and self.stochastic_depth)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """B×3×H×W images in [0,1] -> list of 4 maps B×C_i×(H/s_i)×(W/s_i)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B×3×H×W images, got shape {tuple(images.shape)}")
        if self.graphs is not None and images.is_cuda and not torch.is_grad_enabled():
            return self.graphs.run("stages", self._stages, images)
        return self._stages(images)

    def _stages(self, images: Tensor) -> list[Tensor]:
        pixels = (images - self.mean) / self.std
        out = self.segformer.encoder(pixels, output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)


def load_mit_teacher(checkpoint: str | os.PathLike[str] | None, preset: str = "mit_b1",
                     stochastic_depth: bool = False) -> MiTTeacher:
    """Build the frozen teacher; ``checkpoint=None`` keeps random weights; ``stochastic_depth``: see
    :class:`MiTTeacher`.

    ``checkpoint`` is a Hugging Face folder, an NVlabs ``.pth`` state dict, an mmseg checkpoint
    (``state_dict`` with ``backbone.`` keys) or a transformers-layout weight file. Loading is strict.
    """
    config = mit_config(preset)
    if checkpoint is None:
        return MiTTeacher(config, stochastic_depth)
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"MiT teacher checkpoint {path} does not exist: {_WEIGHTS_HINT}")
    if path.is_dir():
        _check_hf_config(path, preset)
        state = _read_hf_weights(path)
    else:
        state = _read_file(path)
    teacher = MiTTeacher(config, stochastic_depth)
    encoder = teacher.segformer
    if _is_hf_layout(state):
        state = {k.removeprefix("segformer."): v for k, v in state.items()
                 if not k.startswith(("classifier.", "decode_head."))}
        _check_keys(state, encoder.state_dict(), path)
    else:
        _check_keys(state, to_nvlabs_state_dict(encoder), path)
        state = nvlabs_to_hf_state_dict(state)
    encoder.load_state_dict(state, strict=True)
    return teacher


def nvlabs_key_to_hf(key: str) -> str:
    """Map one NVlabs MiT parameter name to its transformers ``SegformerModel`` name.

    ``block{s}.{j}.attn.kv.*`` has no single counterpart (see :func:`nvlabs_to_hf_state_dict`);
    other unknown names raise ``KeyError``.
    """
    m = _NV_KEY.match(key)
    if m is None:
        raise KeyError(key)
    embed_stage, embed_part, norm_stage, block_stage, layer, sub, param = m.groups()
    if embed_stage is not None:
        part = "proj" if embed_part == "proj" else "layer_norm"
        return f"encoder.patch_embeddings.{int(embed_stage) - 1}.{part}.{param}"
    if norm_stage is not None:
        return f"encoder.layer_norm.{int(norm_stage) - 1}.{param}"
    if sub not in _BLOCK_MAP:
        raise KeyError(key)
    return f"encoder.block.{int(block_stage) - 1}.{layer}.{_BLOCK_MAP[sub]}.{param}"


def hf_key_to_nvlabs(key: str) -> str:
    """Inverse of :func:`nvlabs_key_to_hf` (``attention.self.key``/``value`` map to ``attn.kv``)."""
    m = _HF_KEY.match(key)
    if m is None:
        raise KeyError(key)
    embed_stage, embed_part, norm_stage, block_stage, layer, sub, param = m.groups()
    if embed_stage is not None:
        part = "proj" if embed_part == "proj" else "norm"
        return f"patch_embed{int(embed_stage) + 1}.{part}.{param}"
    if norm_stage is not None:
        return f"norm{int(norm_stage) + 1}.{param}"
    if sub in ("attention.self.key", "attention.self.value"):
        return f"block{int(block_stage) + 1}.{layer}.attn.kv.{param}"
    if sub not in _BLOCK_MAP_INV:
        raise KeyError(key)
    return f"block{int(block_stage) + 1}.{layer}.{_BLOCK_MAP_INV[sub]}.{param}"


def nvlabs_to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVlabs encoder state dict (no ``head.*``) -> ``SegformerModel`` state dict."""
    out = {}
    for key, value in state.items():
        if ".attn.kv." in key:
            # NVlabs reshapes kv(x) to (B, N, 2, heads, head_dim) and takes index 0 as key:
            # the first half of the output rows is the key projection, the second the value.
            prefix = nvlabs_key_to_hf(key.replace(".attn.kv.", ".attn.q."))
            k, v = value.chunk(2, dim=0)
            out[prefix.replace(".query.", ".key.")] = k
            out[prefix.replace(".query.", ".value.")] = v
        else:
            out[nvlabs_key_to_hf(key)] = value
    return out


def to_nvlabs_state_dict(model: MiTTeacher | SegformerModel) -> dict[str, Tensor]:
    """Export encoder weights in the NVlabs ``mix_transformer`` layout (key/value fused into ``kv``)."""
    encoder = model.segformer if isinstance(model, MiTTeacher) else model
    state = encoder.state_dict()
    out = {}
    for key, value in state.items():
        if ".attention.self.value." in key:
            continue
        if ".attention.self.key." in key:
            value = torch.cat([value, state[key.replace(".key.", ".value.")]], dim=0)
        out[hf_key_to_nvlabs(key)] = value.detach().clone()
    return out


def _is_hf_layout(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("encoder.", "segformer.encoder.")) for k in state)


def _check_hf_config(folder: Path, preset: str) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json, so it is not a Hugging Face model folder: {_WEIGHTS_HINT}")
    try:
        config = SegformerConfig.from_json_file(str(config_file))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_file}: {err}") from err
    expected = _PRESETS[preset]
    differ = [f"{name}={getattr(config, name, None)} (preset {preset}: {expected[name]})"
              for name in _ARCH_FIELDS if list(getattr(config, name, None) or []) != expected[name]]
    if differ:
        raise CheckpointError(f"{config_file} does not describe a {preset} encoder: " + ", ".join(differ))


def _read_hf_weights(folder: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.is_file():
        return _read_file(safetensors_file)
    if bin_file.is_file():
        return _read_file(bin_file)
    raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin: {_WEIGHTS_HINT}")


def _read_file(path: Path) -> dict[str, Tensor]:
    """Read a weight file; unwrap mmseg checkpoints and drop classification/decode heads."""
    state = read_weight_file(path, "MiT checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if isinstance(state.get("state_dict"), dict):  # mmseg: backbone under "backbone.", heads beside it
        return {k.removeprefix("backbone."): v for k, v in state["state_dict"].items()
                if not k.startswith(("decode_head.", "auxiliary_head."))}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _check_keys(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(f"{k} {_shape(state[k])} (expected {_shape(expected[k])})"
                       for k in expected.keys() & state.keys() if _shape(state[k]) != _shape(expected[k]))
    problems = [f"{label}: {_head(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit the MiT teacher; " + "; ".join(problems))


def _shape(value: object) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _head(items: list[str], limit: int = 10) -> str:
    """Keep the message readable when a wholly wrong file mismatches hundreds of keys."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
