"""construct.inference: dense CRF (real H&E), CRF pool, TTA, tiling and the predictor, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import DEMO_RANDOM, HE_FIXTURE

from construct.config import CrfConfig, load_config
from construct.constants import CLIP_MEAN, CLIP_STD
from construct.data.io import read_image
from construct.errors import ConfigError
from construct.inference.crf import crf_batch, dense_crf
from construct.inference.postprocess import select_presence
from construct.inference.predictor import Predictor
from construct.inference.tiling import forward_any_size, tile_starts, tiled_forward
from construct.inference.tta import TtaSettings, intensity_tta, resize_tta, scaled_size
from construct.models.build import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config():
    return load_config(DEMO_RANDOM, ["inference.batch_size=4"])


@pytest.fixture(scope="module")
def model(config):
    return build_model(config).eval()


@pytest.fixture(scope="module")
def he_crop() -> np.ndarray:
    return read_image(HE_FIXTURE)[288:480, 288:480].copy()


def _box_blur(values: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    sums = np.pad(np.pad(values, radius, mode="edge").cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (sums[size:, size:] - sums[:-size, size:] - sums[size:, :-size] + sums[:-size, :-size]) / size**2


def test_crf_moves_noisy_labels_toward_clean_ones(he_crop):
    # Clean labels follow the image: tertiles of the smoothed brightness (nuclei / tissue / pale).
    brightness = _box_blur(he_crop.astype(np.float64).mean(axis=-1), 3)
    clean = np.digitize(brightness, np.quantile(brightness, [1 / 3, 2 / 3]))
    unary = np.log(np.where(np.arange(5)[:, None, None] == clean[None], 0.6, 0.1))
    noisy_logits = unary + np.random.default_rng(0).normal(0.0, 2.0, unary.shape)
    probs = np.exp(noisy_logits - noisy_logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    refined = dense_crf(he_crop, probs, CrfConfig())
    assert refined.shape == clean.shape and refined.dtype == np.uint8
    noisy_agreement = (probs.argmax(axis=0) == clean).mean()
    crf_agreement = (refined == clean).mean()
    assert crf_agreement > noisy_agreement + 0.15, (noisy_agreement, crf_agreement)


def test_crf_pool_matches_serial(he_crop):
    rng = np.random.default_rng(1)
    images = [he_crop[y:y + 96, x:x + 96].copy() for y in (0, 96) for x in (0, 96)]
    probs = [rng.random((5, 96, 96), dtype=np.float32) for _ in images]
    serial = crf_batch(images, probs, CrfConfig(), workers=1)
    pooled = crf_batch(images, probs, CrfConfig(), workers=2)
    assert len(pooled) == len(images)
    for a, b in zip(serial, pooled):
        np.testing.assert_array_equal(a, b)


def test_tta_off_is_one_forward(model, config):
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = model(images)
    predictor = Predictor(model, config, CPU, tta=False, crf=False)
    cams, logits = predictor.network(images)
    torch.testing.assert_close(cams, out.cams)
    torch.testing.assert_close(logits, out.logits)
    assert predictor.tta.record() == {"mode": "off", "factors": [1.0], "flip": False, "forward_passes": 1}


class TrunkInputs:
    """Records every tensor the CONCH trunk receives (its patch embedding's input) while in use."""

    def __init__(self, model) -> None:
        self.patch_embed = model.student.visual.trunk.patch_embed
        self.seen: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        self.handle = self.patch_embed.register_forward_pre_hook(lambda _, args: self.seen.append(args[0].clone()))
        return self.seen

    def __exit__(self, *exc_info: object) -> None:
        self.handle.remove()


def clip_normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_intensity_tta_multiplies_the_normalised_input_and_averages_unflipped(model):
    images = torch.rand(2, 3, 224, 224)
    factors = (0.9, 1.0, 1.1)
    with torch.no_grad(), TrunkInputs(model) as seen:
        cams, logits = TtaSettings("intensity", factors, flip=True).forward(model, images)
    # The passes: the tile at its own size, CONCH-normalised, (un)flipped, times each factor; the plain
    # pass is the unflipped x1.0 one, not run again.
    expected = [(clip_normalised(images).flip(-1) if mirrored else clip_normalised(images)) * factor
                for factor in factors for mirrored in (False, True)]
    assert len(seen) == len(expected) == TtaSettings("intensity", factors, flip=True).forward_passes == 6
    for received, wanted in zip(seen, expected):
        assert received.shape == (2, 3, 224, 224)
        torch.testing.assert_close(received, wanted)
    # Independent route to the same passes: a [0, 1] image whose CLIP normalisation is the scaled one.
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        passes = [model(mean + factor * (images - mean)) for factor in factors]
        mirrored = [model((mean + factor * (images - mean)).flip(-1)) for factor in factors]
        plain = model(images)
    mean_cams = (sum(p.cams for p in passes) + sum(m.cams.flip(-1) for m in mirrored)) / 6
    torch.testing.assert_close(cams, mean_cams, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, plain.logits, atol=0, rtol=0)  # the plain pass's logits, not a mean
    # Scaling the [0, 1] image instead (what the released code does not do) gives other CAMs.
    with torch.no_grad():
        brightened = model(images * 1.1).cams
    assert not torch.allclose(brightened, passes[2].cams, atol=1e-3)


def test_intensity_tta_without_the_unit_factor_runs_the_plain_pass(model):
    images = torch.rand(1, 3, 224, 224)
    settings = TtaSettings("intensity", (0.8, 1.2), flip=False)
    with torch.no_grad(), TrunkInputs(model) as seen:
        cams, logits = settings.forward(model, images)
    with torch.no_grad():
        augmented = [model(images, intensity=factor).cams for factor in (0.8, 1.2)]
        plain = model(images)
    assert len(seen) == settings.forward_passes == 3
    for received, factor in zip(seen, (0.8, 1.2, 1.0)):
        torch.testing.assert_close(received, clip_normalised(images) * factor)
    torch.testing.assert_close(cams, (augmented[0] + augmented[1]) / 2)
    torch.testing.assert_close(logits, plain.logits, atol=0, rtol=0)


def test_resize_tta_passes_and_flip_equivariance(model):
    images = torch.rand(1, 3, 224, 224)
    scales = [0.9, 1.0, 1.1]
    with torch.no_grad(), TrunkInputs(model) as seen:
        cams, logits = resize_tta(model, images, scales, flip=True)
    assert [tuple(x.shape[-2:]) for x in seen] == [(224, 224)] * 2 + [(208, 208)] * 2 + [(240, 240)] * 2
    torch.testing.assert_close(seen[0], clip_normalised(images))
    torch.testing.assert_close(seen[1], clip_normalised(images).flip(-1))
    resized = F.interpolate(images, size=(208, 208), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[2], clip_normalised(resized))
    with torch.no_grad():
        mirrored, mirrored_logits = resize_tta(model, images.flip(-1), scales, flip=True)
    assert cams.shape == (1, 4, 14, 14) and logits.shape == (1, 4)
    # Averaging over both flips and un-flipping each pass makes the result mirror with the input.
    torch.testing.assert_close(mirrored, cams.flip(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mirrored_logits, logits, atol=1e-4, rtol=1e-4)
    assert scaled_size(224, 0.9) == 208 and scaled_size(224, 1.1) == 240


def test_resize_tta_needs_the_unit_scale(model):
    with pytest.raises(ConfigError, match="1.0"):
        resize_tta(model, torch.rand(1, 3, 224, 224), [0.9, 1.1], flip=False)


@pytest.mark.parametrize("mode, tiles", [("intensity", (224, 224)), ("resize", None)])
def test_predictor_runs_the_configured_tta_on_every_tile(model, mode, tiles):
    config = load_config(DEMO_RANDOM, ["inference.batch_size=4", f"inference.tta={mode}"])
    predictor = Predictor(model, config, CPU, tta=True, crf=False)
    assert predictor.tta.record() == {"mode": mode, "factors": [0.9, 1.0, 1.1], "flip": True, "forward_passes": 6}
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        direct = (intensity_tta if mode == "intensity" else resize_tta)(model, image, [0.9, 1.0, 1.1], flip=True)
    torch.testing.assert_close(predictor.network(image), direct)
    with TrunkInputs(model) as seen:
        predictor.network(torch.rand(1, 3, 240, 300))  # 4 sliding windows
    assert len(seen) == 6  # one batch of 4 windows per pass
    sizes = {tuple(x.shape[-2:]) for x in seen}
    assert sizes == ({tiles} if tiles else {(208, 208), (224, 224), (240, 240)})
    assert all(len(x) == 4 for x in seen)


def test_tile_starts_cover_the_image_flush():
    assert tile_starts(224, 224, 112) == [0]
    assert tile_starts(300, 224, 112) == [0, 76]
    assert tile_starts(768, 224, 112) == [0, 112, 224, 336, 448, 544]


def test_tiling_averages_overlapping_windows():
    image = torch.rand(3, 300, 260)
    seen = []

    def echo(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # CAMs that are the crop itself: averaging the overlapping windows must give the image back.
        seen.append(len(crops))
        return crops, crops.mean(dim=(2, 3))

    cams, logits = tiled_forward(echo, image, tile=64, stride=48, batch_size=5)
    windows = [image[:, y:y + 64, x:x + 64] for y in tile_starts(300, 64, 48) for x in tile_starts(260, 64, 48)]
    assert max(seen) == 5 and sum(seen) == len(windows) == 6 * 6
    torch.testing.assert_close(cams, image[None])
    torch.testing.assert_close(logits, torch.stack([w.mean(dim=(1, 2)) for w in windows]).mean(dim=0)[None])
    with pytest.raises(ConfigError, match="tile_stride"):
        tiled_forward(echo, image, tile=64, stride=65, batch_size=5)


def test_tiling_one_window_equals_plain_forward(model):
    image = torch.rand(3, 224, 224)
    with torch.no_grad():
        out = model(image[None])
        cams, logits = tiled_forward(lambda x: TtaSettings("off").forward(model, x), image, 224, 112, 4)
    expected = F.interpolate(out.cams, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cams, expected)
    torch.testing.assert_close(logits, out.logits)


def test_images_smaller_than_the_tile_are_upsampled_and_predicted_at_their_own_size(model, config):
    image = torch.rand(1, 3, 230, 200)
    forward = lambda x: TtaSettings("off").forward(model, x)  # noqa: E731
    with torch.no_grad():
        cams, logits = forward_any_size(forward, image, 224, 112, 4)
        upsampled = F.interpolate(image, size=(258, 224), mode="bilinear", align_corners=False)  # short side → 224
        expected = tiled_forward(forward, upsampled[0], 224, 112, 4)
    torch.testing.assert_close(cams, expected[0])
    torch.testing.assert_close(logits, expected[1])
    predictor = Predictor(model, config, CPU, tta=False, crf=False)
    assert predictor.predict_batch(image, names=["tiny.png"])[0].mask.shape == (230, 200)


def test_predictor_outputs(model, config):
    predictor = Predictor(model, config, CPU, tta=False, crf=False)
    images = torch.rand(2, 3, 224, 224)
    results = predictor.predict_batch(images)
    assert len(results) == 2
    for result in results:
        assert result.protocol == config.inference.presence == "predicted"
        assert result.mask.shape == (224, 224) and result.mask.dtype == np.uint8 and result.mask.max() <= 4
        assert result.cams.shape == (4, 224, 224) and result.probs.shape == (5, 224, 224)
        assert result.cams.min() >= 0.0 and result.cams.max() <= 1.0
        np.testing.assert_array_equal(result.mask, result.probs.argmax(axis=0))
        np.testing.assert_array_equal(result.presence, (result.scores > config.inference.presence_gate).astype(np.float32))


def test_ground_truth_presence_gates_absent_classes(model, config):
    presence = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    with Predictor(model, config, CPU, tta=False, crf=True, workers=1) as predictor:
        [result] = predictor.predict_batch(torch.rand(1, 3, 224, 224), presence, protocol="ground_truth")
    assert result.protocol == "ground_truth"
    assert not result.cams[[0, 2, 3]].any()
    assert set(np.unique(result.mask)) <= {1, 4}
    with pytest.raises(ValueError, match="ground-truth"):
        select_presence("ground_truth", torch.zeros(1, 4), 0.5, None)


def test_large_image_goes_through_tiling(model, config):
    predictor = Predictor(model, config, CPU, tta=False, crf=False)
    [result] = predictor.predict_batch(torch.rand(1, 3, 240, 300))
    assert result.mask.shape == (240, 300) and result.cams.shape == (4, 240, 300)
