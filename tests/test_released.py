"""configs/bcss_released.yaml and the switches that reproduce the released code (docs/reproduction.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import BCSS, REPO

from construct.config import load_config
from construct.data.datasets import eval_dataset
from construct.engine.distributed import DistInfo
from construct.engine.objective import ConStructObjective
from construct.engine.trainer import poly_lambda, train
from construct.errors import ConfigError
from construct.inference.evaluate import evaluate_split
from construct.inference.postprocess import cam_probabilities, normalize_cams
from construct.inference.predictor import Predictor
from construct.inference.tta import TtaSettings
from construct.models.build import build_model, build_teacher, load_trained_model
from construct_lab.synthetic.tiles import generate_dataset

PRESET = REPO / "configs" / "bcss_released.yaml"
# The released preset on the tiny random towers (the tiny CONCH has 4 blocks), at 64 px.
TINY = ["model.conch.checkpoint=null", "model.conch.preset=tiny", "model.teacher.checkpoint=null",
        "model.teacher.preset=tiny", "model.feature_blocks=[0,1,2,3]", "model.image_size=64"]


def tiny_released_config(*overrides: str):
    return load_config(PRESET, [*TINY, *overrides])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("released") / "synthetic"
    generate_dataset(root, n_train=16, n_val=2, n_test=3, seed=5, classes=BCSS, size=64)
    return root


def batch(size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, 64, 64, generator=generator)
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)[:size]
    return images, labels


def one_step(config, images, labels) -> dict[str, torch.Tensor]:
    """Parameters after one AdamW step of the objective from the seeded initial model."""
    torch.manual_seed(0)
    model = build_model(config)
    teacher = build_teacher(config) if config.loss.struct_weight > 0 else None
    objective = ConStructObjective(model, teacher, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-3)
    losses = objective(images, labels)
    optimizer.zero_grad()
    losses["total"].backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}, losses


def test_preset_trains_and_evaluates_with_tiny_towers(data_root, tmp_path):
    config = tiny_released_config(f"data.root={data_root}", "testbed.dataset=null", "data.num_workers=0", f"work_dir={tmp_path / 'run'}",
                         "train.batch_size=4", "train.max_iters=3", "train.eval_interval=3", "inference.batch_size=4")
    result = train(config, DistInfo(device=torch.device("cpu")))
    assert result.iterations == 3 and 0.0 <= result.best_miou <= 100.0
    model = load_trained_model(config, tmp_path / "run" / "best.pth")
    assert sorted(model.adapters) == ["2", "3"]  # the distilled level owns an adapter that feeds no CAM
    with Predictor(model, config, torch.device("cpu"), tta=True, crf=True, workers=1) as predictor:
        metrics = evaluate_split(predictor, eval_dataset(config, "test"), config, ["ground_truth"])
    assert 0.0 <= metrics["ground_truth"].miou <= 100.0


def test_unused_distill_level_needs_its_switch():
    with pytest.raises(ConfigError, match="allow_unused_distill_levels"):
        tiny_released_config("model.allow_unused_distill_levels=false")


def test_distilling_a_level_without_cams_trains_the_cams_like_struct_weight_zero():
    images, labels = batch()
    base = ("loss.sim_weight=0",)
    distilled, losses = one_step(tiny_released_config(*base), images, labels)
    plain, _ = one_step(tiny_released_config(*base, "loss.struct_weight=0"), images, labels)
    assert float(losses["struct"].detach()) > 0
    for key, value in plain.items():
        if key.startswith("adapters.2."):
            continue
        assert torch.equal(distilled[key], value), key
    moved = [k for k in plain if k.startswith("adapters.2.") and not torch.equal(distilled[k], plain[k])]
    assert moved, "L_struct should have trained the level-2 adapter"


def test_sim_without_gradient_trains_like_weight_zero():
    images, labels = batch()
    base = ("loss.struct_weight=0", "loss.sim_views=tokens")
    no_grad, losses = one_step(tiny_released_config(*base, "loss.sim_gradient=none"), images, labels)
    off, _ = one_step(tiny_released_config(*base, "loss.sim_weight=0"), images, labels)
    assert float(losses["sim"]) != 0.0 and not losses["sim"].requires_grad
    for key, value in off.items():
        assert torch.equal(no_grad[key], value), key
    with_grad, _ = one_step(tiny_released_config(*base, "loss.sim_gradient=encoder"), images, labels)
    assert any(not torch.equal(with_grad[k], off[k]) for k in off)


def test_dataset_normalization_feeds_the_feature_pass_only():
    images, _ = batch(2)
    clip = build_model(tiny_released_config("model.conch.normalization=clip")).student
    dataset = build_model(tiny_released_config()).student
    mean = torch.tensor([0.66791496, 0.47791372, 0.70623304]).view(1, 3, 1, 1)
    std = torch.tensor([0.1736589, 0.22564577, 0.19820057]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = dataset.visual.trunk.forward_intermediates((images - mean) / std, indices=[3], norm=False,
                                                                intermediates_only=True, output_fmt="NCHW")[0]
        assert torch.allclose(dataset.block_features(images, blocks=[3])[0], expected, atol=1e-6)
        assert not torch.allclose(clip.block_features(images, blocks=[3])[0], expected, atol=1e-3)
        assert torch.equal(clip.encode_image(images), dataset.encode_image(images))


def test_teacher_train_mode_drops_paths_and_eval_mode_does_not():
    images, _ = batch(2)
    stochastic = build_teacher(tiny_released_config())
    deterministic = build_teacher(tiny_released_config("model.teacher.mode=eval"))
    deterministic.train()
    assert stochastic.training and not deterministic.training
    first, second = stochastic(images)[2], stochastic(images)[2]
    assert not torch.equal(first, second)
    assert torch.equal(deterministic(images)[2], deterministic(images)[2])
    stochastic.eval()
    assert torch.equal(stochastic(images)[2], stochastic(images)[2])


def test_adapter_padding_zeros():
    reflect = build_model(tiny_released_config("model.adapter_padding=reflect")).adapters["3"]
    zeros = build_model(tiny_released_config()).adapters["3"]
    assert reflect.body[3].padding_mode == "reflect" and zeros.body[3].padding_mode == "zeros"
    zeros.load_state_dict(reflect.state_dict())
    torch.nn.init.normal_(reflect.body[-1].weight)
    zeros.load_state_dict(reflect.state_dict())
    features = torch.randn(1, reflect.body[0].in_channels, 6, 6)
    reflect.eval(), zeros.eval()
    with torch.no_grad():
        a, b = reflect(features), zeros(features)
    assert torch.allclose(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2], atol=1e-5)  # only the border differs
    assert not torch.allclose(a[..., 0, :], b[..., 0, :], atol=1e-3)


def test_projector_input_raw_sees_the_prototype_norm():
    images, _ = batch(2)
    for mode, changes in (("raw", True), ("normalized", False)):
        # default init: the layer's biases make it not positively homogeneous, so a norm change shows
        model = build_model(tiny_released_config(f"model.projector_input={mode}", "model.projector_init=default")).eval()
        with torch.no_grad():
            before = model(images).cams
            model.prototypes.prototypes.mul_(3.0)
            after = model(images).cams
        assert (not torch.allclose(before, after, atol=1e-4)) == changes, mode


def test_projector_init_trunc_normal():
    default = build_model(tiny_released_config("model.projector_init=default")).adaptive_layer
    trunc = build_model(tiny_released_config()).adaptive_layer
    for layer in (trunc[0], trunc[2]):
        assert torch.count_nonzero(layer.bias) == 0
        assert abs(float(layer.weight.detach().std()) - 0.02) < 0.002
    assert torch.count_nonzero(default[0].bias) > 0


def test_warmup_has_the_released_form():
    schedule = poly_lambda(20, 0.9, warmup_iters=5, warmup_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(1) == pytest.approx(1 - (1 - 1 / 5) * 0.9)
    assert schedule(5) == pytest.approx(1.0)
    assert schedule(12) == pytest.approx((1 - 7 / 20) ** 0.9)  # T, not T - W, in the denominator
    plain, zero = poly_lambda(20, 0.9), poly_lambda(20, 0.9, warmup_iters=0)
    assert all(plain(t) == zero(t) == pytest.approx((1 - t / 20) ** 0.9) for t in range(20))
    with pytest.raises(ConfigError, match="warmup_iters"):
        tiny_released_config("train.warmup_iters=-1")


def test_per_pass_normalisation_averages_scaled_cams():
    model = build_model(tiny_released_config()).eval()
    images, _ = batch(2)
    factors = (0.9, 1.0, 1.1)
    with torch.no_grad():
        per_pass, _ = TtaSettings("intensity", factors, flip=True, normalize_each=True).forward(model, images)
        raw, _ = TtaSettings("intensity", factors, flip=True).forward(model, images)
        passes = [normalize_cams(model(images.flip(-1) if m else images, intensity=f).cams).flip(-1) if m
                  else normalize_cams(model(images, intensity=f).cams) for f in factors for m in (False, True)]
    assert torch.allclose(per_pass, torch.stack(passes).mean(0), atol=1e-6)
    assert not torch.allclose(per_pass, normalize_cams(raw), atol=1e-3)
    presence = torch.ones(2, 4)
    probs = cam_probabilities(per_pass, presence, (64, 64), 10.0, normalized=True)
    expected = F.interpolate(per_pass, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(probs[:, :4], expected.clamp(0, 1), atol=1e-6)
    assert TtaSettings.from_config(tiny_released_config().inference).normalize_each
    assert not TtaSettings.from_config(load_config(REPO / "configs" / "bcss.yaml").inference).normalize_each


def test_align_corners_upsampling():
    cams = torch.rand(1, 4, 4, 4)
    presence = torch.ones(1, 4)
    corners = cam_probabilities(cams, presence, (16, 16), 10.0, normalized=True, align_corners=True)
    assert torch.allclose(corners[:, :4], F.interpolate(cams, size=(16, 16), mode="bilinear", align_corners=True))
    assert not torch.allclose(corners, cam_probabilities(cams, presence, (16, 16), 10.0, normalized=True))


def test_crf_receives_softmax_probabilities_under_crf_softmax(monkeypatch):
    images, _ = batch(2)
    seen = []

    def fake_crf(self, imgs, probs):
        seen.append(np.stack(probs))
        return [p.argmax(axis=0).astype(np.uint8) for p in probs]

    monkeypatch.setattr("construct.inference.crf.CrfPool.__call__", fake_crf)
    for softmax in (True, False):
        config = tiny_released_config(f"inference.crf_softmax={softmax}")
        model = build_model(config)
        with Predictor(model, config, torch.device("cpu"), tta=False, crf=True, workers=1) as predictor:
            prediction = predictor.predict_batch(images, presence_gt=torch.ones(2, 4), protocol="ground_truth")
        probs = np.stack([p.probs for p in prediction])
        expected = torch.softmax(torch.from_numpy(probs), dim=1).numpy() if softmax else probs
        np.testing.assert_allclose(seen[-1], expected, rtol=1e-6)


def test_default_config_keeps_paper_semantics():
    config = load_config(REPO / "configs" / "bcss.yaml")
    assert config.model.conch.normalization == "clip" and config.model.teacher.mode == "eval"
    assert not config.model.allow_unused_distill_levels and config.model.adapter_padding == "reflect"
    assert config.model.projector_input == "normalized" and config.model.projector_init == "default"
    assert config.loss.sim_gradient == "encoder" and config.train.warmup_iters == 0
    inference = copy.deepcopy(config.inference)
    assert (inference.cam_normalization, inference.upsample_align_corners, inference.crf_softmax) == ("after_tta", False, False)


def test_fp16_training_scales_the_loss_and_bf16_does_not():
    from construct.engine.trainer import mixed_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert mixed_precision(tiny_released_config().train, cuda) == (True, torch.float16, True)
    assert mixed_precision(load_config(REPO / "configs" / "bcss.yaml").train, cuda) == (True, torch.bfloat16, False)
    assert mixed_precision(tiny_released_config().train, cpu) == (False, torch.float16, False)


def test_inference_precision_switch():
    from construct.inference.predictor import inference_autocast

    cuda = torch.device("cuda")
    assert not inference_autocast(cuda, tiny_released_config().inference)
    assert inference_autocast(cuda, load_config(REPO / "configs" / "bcss.yaml").inference)
    assert not inference_autocast(torch.device("cpu"), load_config(REPO / "configs" / "bcss.yaml").inference)


def test_full_validation_runs_tta_and_the_crf(data_root, monkeypatch):
    from torch.utils.data import DataLoader

    from construct.engine.validate import validate

    calls = []
    original = Predictor.postprocess

    def spy(self, *args, **kwargs):
        calls.append((self.tta.forward_passes, self.uses_crf))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "postprocess", spy)
    for mode, expected in (("full", [(6, True)]), ("fast", [])):
        calls.clear()
        config = tiny_released_config(f"train.validation={mode}", "inference.crf.enabled=true", f"data.root={data_root}")
        loader = DataLoader(eval_dataset(config, "val"), batch_size=2)
        model = build_model(config)
        model.train()
        metrics = validate(model, loader, config, torch.device("cpu"))
        assert calls == expected and model.training and 0.0 <= metrics["miou"] <= 100.0


def test_crf_image_denormalized_truncates_like_the_released_loader():
    images, _ = batch(2)
    images = (images * 255).round() / 255
    exact_config, released_config = tiny_released_config("inference.crf_image=exact"), tiny_released_config()
    model = build_model(exact_config)
    with Predictor(model, exact_config, torch.device("cpu"), tta=False, crf=False) as exact, \
            Predictor(model, released_config, torch.device("cpu"), tta=False, crf=False) as released:
        rounded = np.stack(exact.crf_images(images)).astype(int)
        truncated = np.stack(released.crf_images(images)).astype(int)
    assert np.array_equal(rounded, (images * 255).round().permute(0, 2, 3, 1).numpy().astype(int))
    difference = rounded - truncated
    assert difference.min() == 0 and difference.max() == 1 and 0.05 < difference.mean() < 0.95


def test_dataset_statistics_are_required_where_used():
    with pytest.raises(ConfigError, match="model.conch.dataset_mean"):
        load_config(REPO / "configs" / "bcss.yaml", ["model.conch.normalization=dataset"])
    with pytest.raises(ConfigError, match="model.conch.dataset_std"):
        load_config(REPO / "configs" / "bcss.yaml", ["inference.crf_image=denormalized", "model.conch.dataset_mean=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="3 values"):
        tiny_released_config("model.conch.dataset_mean=[0.5,0.5]")
