"""Whole-slide prediction: slide reading, tissue, the CAM grid, streaming windows, the mask TIFF, and the
real Aperio fixture end to end (tiny random models; small synthetic slides built here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from shapely.geometry import shape
from support import BCSS, DEMO_RANDOM, FIXTURES, REPO

from construct.classes import ClassSet
from construct.commands import predict_slides
from construct.config import load_config
from construct.data.io import read_image
from construct.data.mask_tiff import MaskTiffWriter, colour_table, pyramid_sizes, read_level
from construct.data.slide_reader import ArrayReader, OpenSlideReader
from construct.errors import DataError
from construct.inference import streaming
from construct.inference.cam_canvas import CamCanvas
from construct.inference.predictor import Predictor
from construct.inference.regions import AREA_MEASUREMENT, rasterize_regions
from construct.inference.slide import open_slide, predict_slide
from construct.inference.streaming import canvas_cell, predict_region, tile_offsets
from construct.inference.tissue import TissueMask, detect_tissue
from construct.models.build import build_model
from construct_lab.synthetic.slide import GLASS, SyntheticSlide, write_synthetic_slide

SVS = FIXTURES / "cmu_small_region.svs"
HE_CROP = FIXTURES / "he_cmu1_crop_768.png"
CPU = torch.device("cpu")
SIZE = 64  # tile side of the in-process models


def config_with(*opts: str):
    """The demo config (tiny presets) at 64-px tiles, with ``opts`` overrides."""
    return load_config(DEMO_RANDOM, [f"model.image_size={SIZE}", "inference.batch_size=8", *opts])


@pytest.fixture(scope="module")
def small_model():
    return build_model(config_with()).eval()


@pytest.fixture(scope="module")
def he_region() -> np.ndarray:
    return read_image(HE_CROP)[:300, :250].copy()


# --- pieces ------------------------------------------------------------------------------------


def test_tile_offsets_cover_the_far_edge_and_cells_align():
    assert tile_offsets(224, 224, 112) == [0]
    assert tile_offsets(100, 224, 112) == [0]  # smaller than a tile: one overhanging tile
    assert tile_offsets(768, 224, 112) == [0, 112, 224, 336, 448, 560]  # 560 + 224 >= 768
    assert canvas_cell(224, 112, 7) == 16 and canvas_cell(224, 112, 14) == 16 and canvas_cell(64, 32, 4) == 16
    assert canvas_cell(224, 100, 14) == 4


def test_cam_canvas_windows_equal_one_whole_upsampling():
    """Tiles streamed in, rows finalised and released: every window equals the same crop of the full map."""
    rng = torch.Generator().manual_seed(0)
    tile, stride, cell, classes = 64, 32, 16, 3
    height, width = 200, 170
    ys, xs = tile_offsets(height, tile, stride), tile_offsets(width, tile, stride)
    tiles = {(x, y): torch.rand(classes, tile // cell, tile // cell, generator=rng) for y in ys for x in xs}
    rows, cols = (ys[-1] + tile) // cell, (xs[-1] + tile) // cell
    sums, counts = torch.zeros(classes, rows, cols), torch.zeros(1, rows, cols)
    for (x, y), cells in tiles.items():
        sums[:, y // cell:y // cell + tile // cell, x // cell:x // cell + tile // cell] += cells
        counts[:, y // cell:y // cell + tile // cell, x // cell:x // cell + tile // cell] += 1
    full = F.interpolate((sums / counts)[None], scale_factor=cell, mode="bilinear", align_corners=False)[0]

    canvas = CamCanvas(classes, rows, cols, cell)
    for y in ys:
        for x in xs:
            canvas.add(tiles[(x, y)], x, y)
        canvas.finalize_until((y + stride) // cell)
        for y0, y1 in ((max(0, y - 40), y - 5), (max(0, y - 33), y)):
            if y1 > y0 and canvas.rows_needed(y0, y1) <= canvas.final_until:
                for x0, x1 in ((0, 50), (37, 170), (120, 170)):
                    torch.testing.assert_close(canvas.window(x0, y0, x1, y1), full[:, y0:y1, x0:x1])
        canvas.release_until(max(0, (y - 40) // cell - 1))
    canvas.finalize_until(rows)
    torch.testing.assert_close(canvas.window(10, 150, 170, 200), full[:, 150:200, 10:170])
    with pytest.raises(ValueError, match="are final and kept"):
        canvas.window(0, 0, 10, 10)  # released long ago


def test_tissue_found_on_a_thumbnail_and_sampled_smoothly():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:75, 0:100]
    ellipse = ((xx - 50) / 40) ** 2 + ((yy - 37.5) / 26) ** 2 <= 1
    thumbnail = np.empty((75, 100, 3), np.uint8)
    thumbnail[:] = GLASS
    stain = np.where(rng.random((75, 100, 1)) < 0.3, (110, 60, 150), (232, 150, 200))  # nuclei on eosin
    thumbnail[ellipse] = stain[ellipse]
    thumbnail[5, 5] = thumbnail[70, 90] = (120, 60, 150)  # single-pixel specks on the glass
    mask = TissueMask(detect_tissue(thumbnail, 0.07), (800, 600))  # an 8x thumbnail of 800 x 600 px
    assert (mask.mask == ellipse).mean() > 0.99 and not mask.mask[5, 5] and not mask.mask[70, 90]
    full_yy, full_xx = np.mgrid[0:600, 0:800]
    full_ellipse = ((full_xx + 0.5) / 8 - 0.5 - 50) ** 2 / 40**2 + ((full_yy + 0.5) / 8 - 0.5 - 37.5) ** 2 / 26**2 <= 1
    sampled = mask.sample(0, 0, 800, 600)
    assert (sampled == full_ellipse).mean() > 0.99  # smooth contour, not 8-px steps
    np.testing.assert_array_equal(mask.sample(300, 250, 120, 90), sampled[250:340, 300:420])
    assert mask.any_in(390, 290, 410, 310) and not mask.any_in(0, 0, 40, 40)
    assert not detect_tissue(SyntheticSlide(200, 200, tissue=False).pixels(np.arange(200), np.arange(200)), 0.07).any()


def test_openslide_reader_picks_a_level_resamples_and_reads_glass_outside(tmp_path):
    path = tmp_path / "pyramid.tif"
    write_synthetic_slide(path, 1500, 1100, mpp=0.5)
    slide = SyntheticSlide(1500, 1100)
    with OpenSlideReader(path) as reader:
        assert reader.size == (1500, 1100) and reader.mpp == 0.5 and reader.mpp_source == "slide properties"
        # Downsample 2 is level 1 itself: read exactly, no resampling.
        np.testing.assert_array_equal(reader.read(0, 0, 700, 500, 2.0), slide.pixels(np.arange(500) * 2, np.arange(700) * 2))
        np.testing.assert_array_equal(reader.read(100, 50, 64, 32, 1.0), slide.pixels(np.arange(50, 82), np.arange(100, 164)))
        # Upsampling 2x (a 0.5 µm/px slide for a 0.25 µm/px model) keeps the content where it was.
        upsampled = reader.read(100, 50, 128, 64, 0.5).astype(np.float32)
        expected = np.asarray(Image.fromarray(slide.pixels(np.arange(50, 82), np.arange(100, 164))).resize((128, 64)))
        assert np.abs(upsampled[4:-4, 4:-4] - expected[4:-4, 4:-4]).mean() < 12
        outside = reader.read(1490, 1090, 20, 20, 1.0)
        assert (outside[15:, 15:] == 255).all() and (outside[:5, :5] == GLASS).all()


def test_mpp_flag_only_fills_in_a_missing_resolution(tmp_path):
    stated, bare = tmp_path / "stated.tif", tmp_path / "bare.tif"
    write_synthetic_slide(stated, 300, 200, mpp=0.5)
    write_synthetic_slide(bare, 300, 200, mpp=None)
    with OpenSlideReader(stated, mpp=0.3) as reader:
        assert reader.mpp == 0.5 and reader.mpp_source == "slide properties"
    with OpenSlideReader(bare, mpp=0.3) as reader:
        assert reader.mpp == 0.3 and reader.mpp_source == "--mpp"
    with pytest.raises(DataError, match="does not state its resolution"):
        OpenSlideReader(bare)


def test_predict_slide_help_explains_every_option(capsys):
    parser = predict_slides.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    assert {"--config", "--checkpoint", "--gpu", "--device", "--mpp", "--out-dir", "--no-crf"} <= set(options)
    assert all(option in text for option in options) and all(action.help for action in parser._actions)


def test_array_reader_mirrors_at_the_border():
    image = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    window = ArrayReader(image).read(2, 3, 4, 4, 1.0)
    np.testing.assert_array_equal(window[:2, :2], image[3:5, 2:4])
    np.testing.assert_array_equal(window[2], image[3, [2, 3, 2, 1]])  # row 5 mirrors row 3
    np.testing.assert_array_equal(window[:, 2], image[[3, 4, 3, 2], 2])  # column 4 mirrors column 2


def test_mask_tiff_pyramid_from_uneven_bands(tmp_path):
    mask = np.random.default_rng(0).integers(0, 5, (700, 530), dtype=np.uint8)
    path = tmp_path / "mask.tif"
    writer = MaskTiffWriter(path, (530, 700), 0.5, tmp_path, BCSS)
    tops = [0, 300, 377, 600]
    writer.write((top, mask[top:bottom]) for top, bottom in zip(tops, tops[1:] + [700]))
    assert writer.sizes == pyramid_sizes(530, 700) == [(530, 700), (265, 350), (133, 175)]
    for level, factor in enumerate((1, 2, 4)):
        np.testing.assert_array_equal(read_level(path, level), mask[::factor, ::factor])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]  # the spooled levels are gone
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == 3 and slide.level_dimensions[1] == (265, 350)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    rgb = np.asarray(slide.read_region((0, 0), 0, (530, 700)).convert("RGB"))
    np.testing.assert_array_equal(rgb, np.array(BCSS.palette, np.uint8)[mask])  # the palette shows class colours


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 3) -> None:
    """``image`` as a tiled pyramidal TIFF of ``levels`` levels (every 2^k-th pixel), at ``mpp``."""
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            pixels_per_cm = 1e4 / (mpp * 2**level)
            tif.write(image[::2**level, ::2**level], tile=(256, 256), photometric="rgb", metadata=None,
                      resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER",
                      **({"subfiletype": 1} if level else {}))


def test_a_slide_with_bounds_is_predicted_in_the_frame_qupath_shows(small_model, tmp_path, monkeypatch):
    """A slide stating openslide.bounds-* (as MIRAX does) gives the outputs of the scanned area alone, in its
    coordinates: those of a slide holding only that area. Tissue outside the bounds plays no part."""
    offset, frame = (256, 128), (768, 640)
    inner = SyntheticSlide(*frame).pixels(np.arange(frame[1]), np.arange(frame[0]))
    outer = SyntheticSlide(1280, 1024, seed=1).pixels(np.arange(1024), np.arange(1280))  # tissue all around
    outer[offset[1]:offset[1] + frame[1], offset[0]:offset[0] + frame[0]] = inner
    write_pyramid(tmp_path / "alone.tif", inner, mpp=1.0)
    write_pyramid(tmp_path / "framed.tif", outer, mpp=1.0)
    bounds = {openslide.PROPERTY_NAME_BOUNDS_X: str(offset[0]), openslide.PROPERTY_NAME_BOUNDS_Y: str(offset[1]),
              openslide.PROPERTY_NAME_BOUNDS_WIDTH: str(frame[0]), openslide.PROPERTY_NAME_BOUNDS_HEIGHT: str(frame[1])}

    class SlideWithBounds(openslide.OpenSlide):
        @property
        def properties(self):
            stated = dict(super().properties)
            return {**stated, **bounds} if "framed" in self._filename else stated

    monkeypatch.setattr(openslide, "OpenSlide", SlideWithBounds)
    with OpenSlideReader(tmp_path / "framed.tif") as framed, OpenSlideReader(tmp_path / "alone.tif") as alone:
        assert framed.offset == offset and framed.size == frame == alone.size and alone.offset == (0, 0)
        for box in ((0, 0, 64, 64, 1.0), (700, 600, 100, 60, 1.0), (-20, -10, 50, 40, 2.0), (100, 50, 64, 32, 0.5)):
            np.testing.assert_array_equal(framed.read(*box), alone.read(*box))  # white outside the frame
        np.testing.assert_array_equal(framed.thumbnail(96), alone.thumbnail(96))
    config = config_with("data.mpp=1.0", "inference.slide.window=128", "inference.slide.regions_min_area_um2=20")
    predictor = Predictor(small_model, config, CPU, tta=False, crf=False)
    reports = {name: predict_slide(open_slide(tmp_path / f"{name}.tif", config), predictor, tmp_path / name)
               for name in ("framed", "alone")}
    assert reports["framed"]["frame_offset_px"] == list(offset) and reports["framed"]["size_px"] == list(frame)
    framed_mask, alone_mask = read_level(tmp_path / "framed" / "framed_mask.tif", 0), read_level(tmp_path / "alone" / "alone_mask.tif", 0)
    assert framed_mask.shape == frame[::-1] and len(np.unique(framed_mask)) > 1
    np.testing.assert_array_equal(framed_mask, alone_mask)
    regions = [json.loads((tmp_path / name / f"{name}_regions.geojson").read_text())["features"] for name in ("framed", "alone")]
    assert len(regions[0]) > 1 and regions[0] == regions[1]


# --- streaming -----------------------------------------------------------------------------------


def test_streamed_region_without_crf_does_not_depend_on_the_window(small_model, he_region):
    results = []
    for window in (1000, 96, 37):
        predictor = Predictor(small_model, config_with(f"inference.slide.window={window}"), CPU, tta=False, crf=False)
        results.append(predict_region(predictor, he_region, "region", keep_cams=True))
    mask, cams = results[0]
    assert mask.shape == he_region.shape[:2] and cams.shape == (4, *he_region.shape[:2]) and len(np.unique(mask)) > 1
    for other_mask, other_cams in results[1:]:
        np.testing.assert_array_equal(other_mask, mask)
        np.testing.assert_array_equal(other_cams, cams)


def test_streamed_crf_windows_with_margin_match_one_window(small_model, he_region):
    masks = {}
    for window, margin in ((1000, 0), (100, 48), (100, 0)):
        config = config_with(f"inference.slide.window={window}", f"inference.slide.margin={margin}")
        with Predictor(small_model, config, CPU, tta=False, crf=True, workers=1) as predictor:
            masks[window, margin] = predict_region(predictor, he_region, "region")[0]
    whole = masks[1000, 0]
    # The margin is what makes windows agree with one CRF over the whole region (without: seams).
    assert (masks[100, 48] == whole).mean() > 0.99 > (masks[100, 0] == whole).mean()


def test_a_tile_sized_image_streams_like_the_tile_predictor(small_model, he_region):
    """One tile: the streamed mask is the tile evaluation's (gating and normalisation per tile)."""
    # Gate 0 keeps every class (this random model's scores would close the gate and leave only BACK).
    predictor = Predictor(small_model, config_with("inference.presence_gate=0"), CPU, tta=False, crf=False)
    for y, x in ((0, 0), (100, 150), (236, 186)):
        tile = he_region[y:y + SIZE, x:x + SIZE].copy()
        streamed, _ = predict_region(predictor, tile, "tile")
        [direct] = predictor.predict_batch(torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255)
        assert len(np.unique(direct.mask)) >= 3
        np.testing.assert_array_equal(streamed, direct.mask)


def test_failure_midway_leaves_no_output(small_model, tmp_path, monkeypatch):
    path = tmp_path / "slide.tif"
    write_synthetic_slide(path, 500, 400, mpp=1.0)
    config = config_with("data.mpp=1.0", "inference.slide.window=128")
    calls = []

    def failing_band(self, canvas, top, bottom):
        calls.append(top)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(self, canvas, top, bottom)

    original = streaming.StreamingPredictor.make_band
    monkeypatch.setattr(streaming.StreamingPredictor, "make_band", failing_band)
    predictor = Predictor(small_model, config, CPU, tta=False, crf=False)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        predict_slide(open_slide(path, config), predictor, out)
    assert list(out.iterdir()) == []  # no TIFF, no PNG, no GeoJSON, no JSON, no scratch folder


def test_slide_without_tissue_is_refused(tmp_path):
    path = tmp_path / "glass.tif"
    write_synthetic_slide(path, 600, 400, mpp=0.5, tissue=False)
    with pytest.raises(DataError, match="no tissue found"):
        open_slide(path, config_with())


# --- the real Aperio slide, end to end through the command ----------------------------------------


def test_predict_slide_on_the_aperio_fixture(tiny_run, tmp_path):
    out = tmp_path / "out"
    # data.mpp=2.0: the model reads the 0.499 µm/px slide at 2 µm/px (16x fewer pixels: a fast test that
    # also resamples; the mask still comes out on the slide's own 0.499 µm/px grid).
    result = subprocess.run([sys.executable, str(REPO / "visualization_utils" / "predict_slide.py"), str(SVS),
                             "--config", str(tiny_run / "config.yaml"), "--checkpoint", str(tiny_run / "best.pth"),
                             "--device", "cpu", "--no-tta", "--out-dir", str(out), "--opts", "data.mpp=2.0"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cmu_small_region_areas.json", "cmu_small_region_mask.tif",
                                                      "cmu_small_region_mask_rgb.ome.tif", "cmu_small_region_overview.png",
                                                      "cmu_small_region_regions.geojson", "cohort.csv", "cohort.json"]
    assert "mm² tissue" in result.stdout

    classes = ClassSet.from_config(load_config(tiny_run / "config.yaml"))
    slide = openslide.OpenSlide(str(out / "cmu_small_region_mask.tif"))
    assert slide.dimensions == (2220, 2967) and slide.level_count == 5
    assert slide.level_dimensions[1:] == ((1110, 1484), (555, 742), (278, 371), (139, 186))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    with tifffile.TiffFile(out / "cmu_small_region_mask.tif") as tif:
        levels = tif.series[0].levels
        assert len(levels) == 5 and levels[0].keyframe.is_tiled
        mask = levels[0].asarray()
    assert mask.shape == (2967, 2220) and mask.max() <= 4
    with tifffile.TiffFile(out / "cmu_small_region_mask_rgb.ome.tif") as tif:  # what QuPath opens
        assert tif.is_ome and len(tif.pages[0].subifds) == 4
        np.testing.assert_array_equal(tif.series[0].levels[2].asarray(), colour_table(classes)[mask[::4, ::4]])

    report = json.loads((out / "cmu_small_region_areas.json").read_text())
    areas = report["areas_mm2"]
    assert sum(areas.values()) == pytest.approx(report["tissue_mm2"], rel=1e-9)
    assert sum(report["fractions"].values()) == pytest.approx(1.0)
    mm2_per_px = (0.499 / 1000) ** 2
    for index, name in enumerate(("TUM", "STR", "LYM", "NEC")):  # outside tissue every pixel is BACK
        assert areas[name] == pytest.approx((mask == index).sum() * mm2_per_px, rel=1e-9)
    # The tissue is the stained part of this 1.1 × 1.5 mm field: well under all of it, well over nothing.
    assert 0.2 < report["tissue_mm2"] / (2220 * 2967 * mm2_per_px) < 0.8
    assert report["mpp"] == 0.499 and report["mpp_source"] == "slide properties" and report["model_mpp"] == 2.0
    assert report["tiles"] > 10 and report["crf"] is True and report["tta"]["mode"] == "off"

    with Image.open(out / "cmu_small_region_overview.png") as overview:
        assert overview.mode == "RGB" and overview.width > 1000 and overview.height > 600

    # The regions as QuPath annotations: valid polygons whose class areas are the JSON's, and which
    # drawn back onto the slide's grid give the mask's class almost everywhere in the tissue.
    geojson = out / "cmu_small_region_regions.geojson"
    features = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    geometries = [shape(f["geometry"]) for f in features]
    assert len(features) > 3 and all(g.is_valid for g in geometries) and shapely.coverage_is_valid(geometries)
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}
    for name in ("TUM", "STR", "LYM", "NEC"):
        traced = sum(f["properties"]["measurements"][AREA_MEASUREMENT] for f in features
                     if f["properties"]["classification"]["name"] == name) / 1e6
        assert traced == pytest.approx(areas[name], rel=0.02, abs=1e-4)
    assert report["regions"]["features"] == len(features) and report["regions"]["mask_level"] == 0  # 0.5 µm/px
    with OpenSlideReader(SVS) as reader:
        tissue = open_slide(SVS, config_with()).tissue.sample(0, 0, *reader.size)
    drawn = rasterize_regions(geojson, (2220, 2967), classes)
    assert (drawn[tissue] == mask[tissue]).mean() >= 0.98
