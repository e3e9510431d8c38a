"""Classes as data: a LUAD-style set and a 3-class CSV cohort go end to end (train, evaluate under both
background conventions, export CAMs, predict a slide) with their own names and colours everywhere;
class mismatches and bad dataset descriptions fail in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from support import BCSS, DEMO_RANDOM, LUAD, REPO

from construct.checkpoint import load_checkpoint
from construct.classes import ClassSet
from construct.config import load_config
from construct.data.datasets import TrainDataset, eval_dataset, train_dataset
from construct.data.io import read_mask, write_mask
from construct.data.labels import parse_label, read_label_csv
from construct.engine.distributed import DistInfo
from construct.engine.trainer import train
from construct.errors import ConfigError, DataError
from construct.inference.postprocess import apply_background_prior
from construct.metrics import ConfusionMatrix
from construct_lab.prepare import prepare_inputs
from construct_lab.synthetic.slide import write_synthetic_slide

CPU = torch.device("cpu")
TRAINING = ["data.num_workers=0", "train.max_iters=2", "train.batch_size=4", "inference.batch_size=8",
            "loss.sim_weight=0", "train.eval_interval=2"]
CUSTOM_CLASSES = [
    {"name": "CANCER", "prompt": "Invasive carcinoma with pleomorphic nuclei.", "color": [200, 30, 120]},
    {"name": "FIBROSIS", "prompt": "Dense fibrous stroma with collagen.", "color": [30, 160, 60]},
    {"name": "INFLAMMATION", "prompt": "Sheets of lymphocytes and plasma cells.", "color": [20, 60, 200]},
]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def luad_config(root: Path) -> Path:
    """The demo recipe (tiny random towers) on a LUAD-style synthetic set: spaced labels, valid/, alveoli."""
    return write_yaml(root / "luad.yaml", {
        "_base_": [str(DEMO_RANDOM), str(REPO / "configs/datasets/luad_histoseg.yaml")],
        "work_dir": str(root / "run"),
        # TE, NEC, LYM, TAS drawn with the tumour, necrosis, lymphocyte and stroma textures
        "data": {"root": str(root / "data")}, "testbed": {"dataset": {"train": 8, "val": 2, "test": 3, "seed": 1,
                 "textures": [0, 3, 2, 1], "label_format": "spaced", "val_folder": "valid", "alveoli": True}},
    })


def custom_config(root: Path) -> Path:
    """Three classes of one's own, labels in a CSV, background listed first in the masks."""
    return write_yaml(root / "custom.yaml", {
        "_base_": str(DEMO_RANDOM),
        "work_dir": str(root / "run"),
        "data": {"name": "my-cohort", "classes": CUSTOM_CLASSES, "label_csv": "labels.csv",
                 "background": {"name": "GLASS", "color": [250, 250, 250], "index": 0},
                 "root": str(root / "data")}, "testbed": {"dataset": {"train": 8, "val": 2, "test": 3, "seed": 2}},
    })


def run_script(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "visualization_utils" / f"{name}.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["luad", "custom"])
def trained(request, tmp_path_factory) -> tuple[Path, ClassSet]:
    """A 2-iteration run on a generated non-BCSS set; returns (run folder, its class set)."""
    root = tmp_path_factory.mktemp(request.param)
    path = (luad_config if request.param == "luad" else custom_config)(root)
    config = load_config(path, TRAINING)
    prepare_inputs(config, DistInfo(device=CPU))
    train(config, DistInfo(device=CPU))
    return root / "run", ClassSet.from_config(config)


def test_the_generated_layouts_are_what_the_presets_describe(trained):
    run, classes = trained
    config = load_config(run / "config.yaml")
    root = Path(config.data.root)
    if classes.names == LUAD.names:
        assert (root / "valid").is_dir() and not (root / "val").exists()
        assert all(" " in p.name.rsplit("[", 1)[1] for p in (root / "train").glob("*.png"))  # [1 0 0 1]
        masks = [read_mask(p, classes) for p in (root / "test" / "mask").glob("*.png")]
        assert any((m == classes.background).any() for m in masks)  # the alveoli are background
    else:
        rows = read_label_csv(root / "labels.csv", classes.names)
        assert set(rows) == {p.name for p in (root / "train").glob("*.png")}
        assert not any("[" in name for name in rows)
        with Image.open(next((root / "test" / "mask").glob("*.png"))) as mask:
            palette = mask.getpalette()
        assert palette[:3] == [250, 250, 250]  # background is mask value 0 in this dataset
        assert palette[3:6] == CUSTOM_CLASSES[0]["color"]
    labels = train_dataset(config).labels
    assert labels.shape[1] == classes.num_classes and bool((labels.sum(1) > 0).all())
    assert eval_dataset(config, "val")[0]["presence"].shape == (classes.num_classes,)


def test_checkpoint_records_its_classes(trained):
    run, classes = trained
    assert load_checkpoint(run / "latest.pth")["classes"] == list(classes.names)


def test_evaluate_under_both_background_conventions(trained, tmp_path):
    run, classes = trained
    seen = {}
    for convention in ("counted", "ignored"):
        result = run_script("evaluate_performance", "--config", run / "config.yaml", "--checkpoint", run / "latest.pth",
                            "--device", "cpu", "--no-tta", "--workers", "1", "--protocol", "predicted",
                            "--background", convention, "--out", tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"background {convention}" in result.stdout
        for name in classes.all_names:
            assert f"\n{name} " in result.stdout
        assert "mean over " + "/".join(classes.names) in result.stdout
        suffix = "" if convention == "counted" else "_background-ignored"
        record = json.loads((tmp_path / f"metrics_test_predicted{suffix}.json").read_text())
        assert record["background"] == convention and list(record["per_class"]) == list(classes.all_names)
        seen[convention] = record
    assert seen["ignored"]["per_class"][classes.background_name]["iou"] is None
    counted = np.array(seen["counted"]["confusion_matrix"])
    assert counted.shape == (classes.num_classes + 1,) * 2


def test_cam_export_uses_the_dataset_palette(trained, tmp_path):
    run, classes = trained
    result = run_script("generate_cam", "--config", run / "config.yaml", "--checkpoint", run / "latest.pth",
                        "--device", "cpu", "--split", "test", "--no-tta", "--no-crf", "--save-cam", "--overlay",
                        "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "generate_cam.json").read_text())
    assert info["cam_channels"] == list(classes.names)
    assert {name: v["color"] for name, v in info["classes"].items()} == dict(zip(classes.all_names, map(list, classes.palette)))
    mask_path = next(p for p in tmp_path.glob("*.png"))
    with Image.open(mask_path) as img:
        palette = img.getpalette()
    for internal, value in enumerate(classes.mask_values):
        assert palette[3 * value: 3 * value + 3] == list(classes.palette[internal])
    assert read_mask(mask_path, classes).max() <= classes.num_classes
    assert np.load(next((tmp_path / "cam").glob("*.npy"))).shape[0] == classes.num_classes


def test_slide_outputs_name_the_dataset_classes(trained, tmp_path):
    run, classes = trained
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, 700, 500, mpp=1.0)
    result = run_script("predict_slide", slide, "--config", run / "config.yaml", "--checkpoint", run / "latest.pth",
                        "--device", "cpu", "--no-tta", "--workers", "1", "--out-dir", tmp_path / "out",
                        "--opts", "data.mpp=1.0")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "slide_areas.json").read_text())
    assert list(report["areas_mm2"]) == list(classes.all_names)
    assert report["class_colors"] == {n: list(c) for n, c in zip(classes.all_names, classes.palette)}
    with tifffile.TiffFile(tmp_path / "out" / "slide_mask.tif") as tif:
        page = tif.pages[0]
        assert all(name in page.description for name in classes.all_names)
        colormap = page.colormap
    for index, rgb in enumerate(classes.palette):
        assert list(colormap[:, index] // 257) == list(rgb)


def test_a_checkpoint_of_other_classes_is_refused_in_one_line(trained, tmp_path):
    run, classes = trained
    result = run_script("evaluate_performance", "--config", DEMO_RANDOM, "--checkpoint",
                        run / "latest.pth", "--device", "cpu", "--no-tta", "--no-crf")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert f"[{', '.join(classes.names)}]" in lines[0] and "[TUM, STR, LYM, NEC]" in lines[0]


# --- bad dataset descriptions and inputs: one line naming the file, row or key ------------------------


def test_label_csv_problems_name_file_and_row(tmp_path):
    (tmp_path / "train").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "pink").save(tmp_path / "train" / name)
    cases = {
        "filename,TUM,STR,LYM,NEC\na.png,1,0,0,0\nb.png,0,1,0,0\nc.png,1,0,0,0\n": r"labels.csv: row for c.png: no such tile",
        "filename,labels\na.png,TUM\nb.png,TUMOR\n": r"row 3: unknown class 'TUMOR'",
        "filename,labels\na.png,1 0 0\nb.png,1 0 0 0\n": r"row 2: label vector of 3 bits, expected 4",
        "filename,TUM,STR,LYM,NEC\na.png,1,0,0,0\nb.png,0,0,0,0\n": r"row 3 \(b.png\): the label has no positive class",
        "filename,TUM,STR,LYM\na.png,1,0,0\n": r"row 1: no column for class NEC",
        "filename,TUM,STR,LYM,NEC\na.png,1,0,0,0\n": r"b.png: no row in .*labels.csv",
    }
    for text, message in cases.items():
        (tmp_path / "labels.csv").write_text(text)
        with pytest.raises(DataError, match=message) as info:
            TrainDataset(tmp_path, BCSS, label_csv="labels.csv")
        assert "\n" not in str(info.value)
    table = "filename,labels\na.png,TUM;NEC\nb.png,[0 1 0 0]\n"
    (tmp_path / "labels.csv").write_text(table)
    assert read_label_csv(tmp_path / "labels.csv", BCSS.names)["a.png"].tolist() == [1, 0, 0, 1]


def test_train_name_without_a_positive_class_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"tile\[0000\].png: the label has no positive class"):
        parse_label(tmp_path / "tile[0000].png", BCSS.names)
    with pytest.raises(DataError, match=r"3 binary digits in the order A B C"):
        parse_label(tmp_path / "tile[1101].png", ("A", "B", "C"))


def test_mask_value_above_the_class_count_names_the_file(tmp_path):
    three = ClassSet.from_names(["A", "B", "C"])
    path = tmp_path / "m.png"
    write_mask(path, np.full((4, 4), 3, np.uint8), three)
    assert (read_mask(path, three) == 3).all()
    Image.fromarray(np.full((4, 4), 4, np.uint8), mode="L").save(path)
    with pytest.raises(DataError, match=r"m.png: mask holds invalid class values 4; expected 0-3"):
        read_mask(path, three)


@pytest.mark.parametrize(("change", "key"), [
    ({"classes": CUSTOM_CLASSES[:1]}, r"'data.classes' needs at least 2 tissue classes"),
    ({"classes": [CUSTOM_CLASSES[0], {"name": "B", "color": [1, 2, 3]}]}, r"'data.classes\[1\].prompt' is required"),
    ({"classes": [CUSTOM_CLASSES[0], {"name": "B", "prompt": "b", "color": [1, 2]}]}, r"'data.classes\[1\].color' must be \[r, g, b\]"),
    ({"classes": [CUSTOM_CLASSES[0], {"name": "CANCER", "prompt": "b", "color": [1, 2, 3]}]}, r"'data.classes\[1\].name' 'CANCER' is used twice"),
    ({"classes": CUSTOM_CLASSES, "background": {"index": 7}}, r"'data.background.index' must be a mask value in 0..3"),
])
def test_bad_dataset_descriptions_fail_naming_the_key(tmp_path, change, key):
    path = write_yaml(tmp_path / "bad.yaml", {"_base_": str(DEMO_RANDOM), "data": change})
    with pytest.raises(ConfigError, match=key) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_luad_and_bcss_presets():
    luad = load_config(REPO / "configs/luad.yaml")
    assert ClassSet.from_config(luad).names == ("TE", "NEC", "LYM", "TAS")
    assert luad.data.background_prior is not None and luad.data.background_prior.grey_threshold == 200
    assert luad.train == load_config(REPO / "configs/bcss.yaml").train  # the paper's recipe, other data
    assert load_config(REPO / "configs/bcss.yaml").data.background_prior is None
    assert LUAD.palette == ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255))


def test_background_prior_forces_bright_regions_but_not_small_holes():
    image = np.full((20, 20, 3), 120, np.uint8)
    image[2:12, 2:12] = 230  # a 100-px bright region: an alveolus
    image[15:17, 15:17] = 240  # a 4-px bright hole: left to the model
    mask = np.zeros((20, 20), np.uint8)
    out = apply_background_prior(mask, image, grey_threshold=200, min_size=50, background=4)
    assert (out[2:12, 2:12] == 4).all() and (out[15:17, 15:17] == 0).all() and (out[0, 0] == 0)


def test_fast_validation_applies_the_background_prior(tmp_path):
    from construct.engine.validate import validate
    from construct.models.build import build_model

    torch.manual_seed(0)
    images = torch.full((2, 3, 224, 224), 0.5)  # tumour on the left half (grey 128: tissue) ...
    images[..., 112:] = 1.0  # ... and a bright, tissue-free right half: background by LUAD's prior
    masks = torch.full((2, 224, 224), LUAD.background)
    masks[..., :112] = 0
    batch = {"image": images, "mask": masks, "presence": torch.tensor([[1.0, 0, 0, 0]] * 2)}
    scores = {}
    for prior in ("{grey_threshold: 200, min_size: 50}", "null"):
        config = load_config(luad_config(tmp_path), ["inference.presence=ground_truth", "evaluation.background=counted",
                                                      f"data.background_prior={prior}"])
        scores[prior] = validate(build_model(config), [batch], config, torch.device("cpu"))["miou"]
    assert scores["null"] < 99.0  # the tumour CAM spills onto the bright half ...
    assert scores["{grey_threshold: 200, min_size: 50}"] == pytest.approx(100.0)  # ... which the prior makes background


def test_ignored_background_leaves_out_gt_background_pixels():
    matrix = ConfusionMatrix(("A", "B", "BACK"))
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 2, 1, 0, 2, 2])  # one A pixel predicted as background; one BACK pixel as A
    matrix.update(pred, target)
    counted, ignored = matrix.compute("counted"), matrix.compute("ignored")
    assert counted.iou[0] == pytest.approx(100 / 3)  # TP 1 / (GT 2 + pred 2 - 1)
    assert ignored.iou[0] == pytest.approx(50.0)  # the BACK pixel predicted A no longer counts
    assert np.isnan(ignored.iou[2]) and ignored.pixel_accuracy == pytest.approx(200 / 3)
    assert counted.to_dict()["background"] == "counted" and "background ignored" in ignored.format_table()
