"""Cohorts of whole slides: class regions as QuPath GeoJSON, a bad slide among good ones, resuming, and the
slide list split over torchrun ranks (tiny random model, small synthetic slides built here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import shape
from support import DEMO_RANDOM, REPO

from construct.checkpoint import save_checkpoint
from construct.classes import ClassSet
from construct.cli import run_cli
from construct.commands import predict_slides
from construct.config import load_config, save_config
from construct.data.mask_tiff import MaskTiffWriter, read_level
from construct.inference import cohort, regions
from construct.inference.cohort import split_by_area
from construct.inference.regions import AREA_MEASUREMENT, RegionSettings, rasterize_regions, trace_level, write_regions
from construct.models.build import build_model
from construct_lab.synthetic.slide import write_synthetic_slide

SCRIPT = REPO / "visualization_utils" / "predict_slide.py"
CLASSES = ClassSet.from_names(["TUM", "STR", "LYM", "NEC"], [(200, 0, 0), (0, 150, 0), (0, 0, 200), (150, 0, 150)])


def blob_mask(height: int, width: int, seed: int) -> np.ndarray:
    """Class blobs (with holes and islands) inside an ellipse of tissue; background 4 around it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, (height // 40 + 2, width // 40 + 2))
    mask = np.kron(coarse, np.ones((40, 40), np.int64))[:height, :width].astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    mask[((xx - width / 2) / (0.6 * width)) ** 2 + ((yy - height / 2) / (0.55 * height)) ** 2 > 1] = 4  # corners
    mask[500:600, 400:500] = 2
    mask[530:570, 430:470] = 4  # a hole of background in a LYM region
    return mask


def write_mask(path: Path, mask: np.ndarray, mpp: float) -> None:
    MaskTiffWriter(path, (mask.shape[1], mask.shape[0]), mpp, path.parent, CLASSES).write(
        (top, mask[top:top + 300]) for top in range(0, mask.shape[0], 300))


def test_regions_geojson_is_valid_qupath_and_reproduces_the_mask(tmp_path, monkeypatch):
    mask = blob_mask(1101, 901, seed=1)  # odd sizes: level 1's last pixels reach past the edge
    write_mask(tmp_path / "mask.tif", mask, mpp=0.25)
    settings = RegionSettings(simplify_um=1.0, min_area_um2=20.0)
    whole = write_regions(tmp_path / "mask.tif", tmp_path / "whole.geojson", CLASSES, 0.25, settings)
    assert whole.level == 1  # 0.5 µm/px: the coarsest level within half the tolerance
    collection = json.loads((tmp_path / "whole.geojson").read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == whole.features > 20
    geometries = [shape(feature["geometry"]) for feature in collection["features"]]
    assert all(g.geom_type == "Polygon" and g.is_valid for g in geometries)
    assert any(len(g.interiors) for g in geometries)  # holes kept
    # The features tile the tissue: no two overlap, and shared edges match vertex for vertex.
    assert shapely.coverage_is_valid(geometries)
    assert shapely.union_all(geometries).area == pytest.approx(sum(g.area for g in geometries), rel=1e-12)
    for feature, geometry in zip(collection["features"], geometries):
        properties = feature["properties"]
        name = properties["classification"]["name"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["color"] == list(CLASSES.colors[CLASSES.names.index(name)])
        assert properties["measurements"][AREA_MEASUREMENT] == pytest.approx(geometry.area * 0.0625, abs=1e-3)
    # Regions touching the slide's edge are clipped to it.
    assert shapely.union_all(geometries).bounds == pytest.approx((0, 0, 901, 1101), abs=1e-9)
    for index, name in enumerate(CLASSES.names):
        assert whole.area_um2[name] == pytest.approx((mask == index).sum() * 0.0625, rel=0.02)
    tissue = mask != 4
    assert (rasterize_regions(tmp_path / "whole.geojson", (901, 1101), CLASSES)[tissue] == mask[tissue]).mean() >= 0.98

    # Traced band by band (bands of one tile row): regions crossing band edges come out whole, still tiling,
    # simplified alike but for the vertices kept where outlines cross a band edge.
    monkeypatch.setattr(regions, "BAND_PIXELS", 1)
    banded = write_regions(tmp_path / "mask.tif", tmp_path / "banded.geojson", CLASSES, 0.25, settings)
    banded_geometries = [shape(f["geometry"]) for f in json.loads((tmp_path / "banded.geojson").read_text())["features"]]
    assert banded.features == whole.features and shapely.coverage_is_valid(banded_geometries)
    assert banded.area_um2 == pytest.approx(whole.area_um2, rel=1e-3)
    assert shapely.union_all(banded_geometries).symmetric_difference(shapely.union_all(geometries)).area < 1e-3 * sum(
        g.area for g in geometries)


def test_small_regions_are_dropped_and_the_level_follows_the_tolerance(tmp_path):
    mask = np.full((600, 600), 4, np.uint8)
    mask[100:300, 100:300] = 0
    mask[400:403, 400:403] = 1  # 9 px = 2.25 µm² at 0.5 µm/px
    write_mask(tmp_path / "mask.tif", mask, mpp=0.5)
    summary = write_regions(tmp_path / "mask.tif", tmp_path / "r.geojson", CLASSES, 0.5, RegionSettings(0.5, 5.0))
    names = [f["properties"]["classification"]["name"] for f in json.loads((tmp_path / "r.geojson").read_text())["features"]]
    assert names == ["TUM"] and summary.area_um2["TUM"] == pytest.approx(200 * 200 * 0.25)
    sizes = [(600, 600), (300, 300), (150, 150)]
    assert [trace_level(sizes, 0.5, t) for t in (0.3, 1.0, 1.9, 2.0, 3.9, 4.0, 50.0)] == [0, 0, 0, 1, 1, 2, 2]


def test_slides_are_split_by_area_deterministically():
    areas = [10, 40, 30, 0, 20]
    plan = split_by_area(areas, 2)
    assert plan == [[0, 1, 3], [2, 4]] == split_by_area(areas, 2)  # 40 + 10 + 0 against 30 + 20
    assert split_by_area(areas, 1) == [[0, 1, 2, 3, 4]]
    assert sorted(i for part in split_by_area(areas, 4) for i in part) == list(range(5))


# --- the command, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A config and a checkpoint of the tiny random model at 64-px tiles, reading slides at 2 µm/px."""
    root = tmp_path_factory.mktemp("cohort_run")
    config = load_config(DEMO_RANDOM, [
        "model.image_size=64", "inference.batch_size=8", "data.mpp=2.0", "inference.slide.window=128",
        "inference.presence_gate=0", "inference.slide.regions_min_area_um2=20"])
    save_config(config, root / "config.yaml")
    save_checkpoint({"model": build_model(config).trainable_state_dict()}, root / "best.pth")
    return root


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Four synthetic slides at 1 µm/px of different sizes (and so different areas)."""
    root = tmp_path_factory.mktemp("slides")
    paths = []
    for index, (width, height) in enumerate(((900, 700), (600, 640), (760, 520), (500, 420))):
        paths.append(root / f"slide{index}.tif")
        write_synthetic_slide(paths[-1], width, height, mpp=1.0, seed=index)
    return paths


def command_args(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), "--device", "cpu", "--no-tta",
            "--no-crf", "--out-dir", str(out), *extra]


def run_in_process(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stopped:
        run_cli(predict_slides.main, predict_slides.build_parser(), argv)
        raise SystemExit(0)
    return stopped.value.code


def output_names(name: str) -> list[str]:
    return [f"{name}_areas.json", f"{name}_mask.tif", f"{name}_mask_rgb.ome.tif", f"{name}_overview.png",
            f"{name}_regions.geojson"]


def test_a_corrupt_slide_fails_alone_and_a_rerun_resumes(tiny_run, slides, tmp_path, capsys, monkeypatch):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00 not really a slide" * 100)
    out = tmp_path / "out"
    paths = [slides[0], corrupt, slides[1]]
    assert run_in_process([*map(str, paths), *command_args(tiny_run, out)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0] and "OpenSlide" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cohort.csv", "cohort.json", *output_names("slide0"), *output_names("slide1")])  # no scratch left behind
    rows = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert [(row["slide"], row["status"]) for row in rows] == [(str(p), s) for p, s in zip(paths, ("done", "failed", "done"))]
    assert rows[1]["error"] == errors[0][len("error: "):] and rows[1]["tissue_mm2"] is None
    assert rows[0]["checkpoint"] == str(tiny_run / "best.pth") and rows[0]["config"] == str(tiny_run / "config.yaml")
    areas = json.loads((out / "slide0_areas.json").read_text(encoding="utf-8"))
    assert rows[0]["tissue_mm2"] == areas["tissue_mm2"] and rows[0]["tiles"] == areas["tiles"] > 0
    assert rows[0]["TUM_share"] == areas["fractions"]["TUM"] and rows[0]["BACK_mm2"] == areas["areas_mm2"]["BACK"]
    csv_lines = (out / "cohort.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("slide,status,error,tissue_mm2,TUM_mm2,TUM_share")

    # The GeoJSON's class areas are the areas JSON's (BACK inside the tissue has no regions).
    collection = json.loads((out / "slide0_regions.geojson").read_text(encoding="utf-8"))
    for name in ("TUM", "STR", "LYM", "NEC"):
        traced = sum(f["properties"]["measurements"][AREA_MEASUREMENT] for f in collection["features"]
                     if f["properties"]["classification"]["name"] == name) / 1e6
        assert traced == pytest.approx(areas["areas_mm2"][name], rel=0.02, abs=1e-4)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("cohort")}
    monkeypatch.setattr(cohort, "predict_slide", lambda *a, **k: pytest.fail("a complete slide was predicted again"))
    monkeypatch.setattr(cohort, "open_slide", _refuse_all_but(corrupt, cohort.open_slide))
    assert run_in_process([*map(str, paths), *command_args(tiny_run, out, "--skip-existing")]) == 1
    rerun = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    assert [row["status"] for row in rerun] == ["skipped", "failed", "skipped"]
    assert [row["tissue_mm2"] for row in rerun] == [row["tissue_mm2"] for row in rows]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("cohort")} == stamps


def _refuse_all_but(corrupt: Path, open_slide):
    def opening(path, *args, **kwargs):
        assert path == corrupt, f"{path} was opened although its outputs are complete"
        return open_slide(path, *args, **kwargs)
    return opening


def test_torchrun_ranks_split_the_slides_and_write_what_one_process_writes(tiny_run, slides, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run (OMP_NUM_THREADS=1): the same arithmetic
    try:
        assert run_in_process([*map(str, slides), *command_args(tiny_run, one, "--workers", "1")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(SCRIPT), *map(str, slides), *command_args(tiny_run, two)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # By area (630k, 384k, 395k, 210k px): rank 0 takes slides 0 and 3, rank 1 slides 2 and 1.
    done = {rank: sorted(line.split(":")[0].split()[-1] for line in result.stdout.splitlines()
                         if line.startswith(f"[rank {rank}]") and "mm² tissue" in line) for rank in (0, 1)}
    assert done == {0: ["slide0.tif", "slide3.tif"], 1: ["slide1.tif", "slide2.tif"]}
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for path in slides:
        name = path.stem
        np.testing.assert_array_equal(read_level(two / f"{name}_mask.tif", 0), read_level(one / f"{name}_mask.tif", 0))
        assert (two / f"{name}_regions.geojson").read_text() == (one / f"{name}_regions.geojson").read_text()

    def table(folder: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((folder / "cohort.json").read_text())]

    assert table(two) == table(one) and [row["status"] for row in table(one)] == ["done"] * 4
