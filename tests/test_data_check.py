"""Users' own tiles: any size and format, every file checked before the model is built, and the
zero-shot check of the class prompts (tiny 64 px tiles, random tiny towers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import BCSS, DEMO_RANDOM

from construct.commands import check_prompts as check_prompts_command
from construct.commands import export as export_command
from construct.config import load_config
from construct.data.check import check_config_data
from construct.data.datasets import EvalDataset, TrainDataset, collate_same_size
from construct.data.io import read_mask, write_mask
from construct.engine.distributed import DistInfo
from construct.engine.trainer import train
from construct.errors import DataError
from construct.inference.evaluate import evaluate_split
from construct.inference.predictor import Predictor
from construct.inference.prompt_check import check_prompts
from construct.models.build import load_trained_model
from construct_lab.synthetic.tiles import generate_dataset

SIZE = 64


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check") / "data"
    generate_dataset(root, n_train=6, n_val=3, n_test=3, seed=1, classes=BCSS, size=SIZE)
    return root


def config_for(root: Path, work_dir: Path, *opts: str):
    return load_config(DEMO_RANDOM, [f"data.root={root}", "testbed.dataset=null", "data.num_workers=0",
                                     f"work_dir={work_dir}", f"model.image_size={SIZE}", "train.batch_size=2",
                                     "train.max_iters=2", "inference.batch_size=2", *opts])


def copy_data(clean: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    return root


def resave(path: Path, suffix: str, size: int | None = None, **params) -> Path:
    """``path`` written again as ``suffix`` (optionally resized), the original removed."""
    with Image.open(path) as img:
        img = img.convert("RGB") if img.mode not in ("P", "L") else img.copy()
    if size is not None:
        img = img.resize((size, size), Image.NEAREST if img.mode in ("P", "L") else Image.BILINEAR)
    target = path.with_suffix(suffix)
    img.save(target, **params)
    if target != path:
        path.unlink()
    return target


def mixed_data(clean: Path, tmp_path: Path) -> Path:
    """The clean tiles as users bring them: JPEG, TIFF and BMP tiles, train tiles of 80 and 48 px,
    val/test images (and masks) of 96 and 48 px, a TIFF mask."""
    root = copy_data(clean, tmp_path)
    train = sorted((root / "train").glob("*.png"))
    resave(train[0], ".jpg", quality=95)
    resave(train[1], ".tif")
    resave(train[2], ".bmp", size=80)
    resave(train[3], ".png", size=48)
    val = sorted((root / "val" / "img").glob("*.png"))
    resave(val[0], ".png", size=96)
    resave(root / "val" / "mask" / val[0].name, ".png", size=96)
    resave(val[1], ".tif")
    resave(root / "val" / "mask" / val[1].name, ".tif")
    test = sorted((root / "test" / "img").glob("*.png"))
    resave(test[0], ".jpg", size=48, quality=95)
    resave(root / "test" / "mask" / test[0].name, ".png", size=48)
    return root


def test_every_problem_is_listed_before_anything_is_built(clean_data, tmp_path, capsys):
    root = copy_data(clean_data, tmp_path)
    train_tile = sorted((root / "train").glob("*.png"))[0]
    unlabelled = train_tile.with_name("no_label.png")
    train_tile.rename(unlabelled)
    masks = sorted((root / "val" / "mask").glob("*.png"))
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(masks[0])  # RGB
    values = np.zeros((SIZE, SIZE), np.uint8)
    values[:4, :4] = 9
    Image.fromarray(values, mode="L").save(masks[1])
    test_mask = sorted((root / "test" / "mask").glob("*.png"))
    write_mask(test_mask[0], np.zeros((SIZE // 2, SIZE), np.uint8), BCSS)  # another size
    test_mask[1].unlink()
    work_dir = tmp_path / "run"

    with pytest.raises(DataError) as info:
        train(config_for(root, work_dir), DistInfo(device=torch.device("cpu")))
    listed = capsys.readouterr()
    assert str(info.value).startswith(f"5 problems in the dataset {root}")
    for path, reason in [(unlabelled, "no [...] label group"), (masks[0], "mode 'RGB'"),
                         (masks[1], "invalid class values 9"), (test_mask[0], "mask size 64×32 does not match"),
                         (test_mask[1], "mask missing")]:
        assert any(str(path) in line and reason in line for line in listed.err.splitlines()), (path, listed.err)
    assert "parameters:" not in listed.out  # the model was never built
    assert not work_dir.exists()  # nothing written


def test_summary_counts_what_the_files_hold(clean_data):
    config = config_for(clean_data, Path("unused"))
    report = check_config_data(config, progress=False)
    assert report.problems == []
    train_set = TrainDataset(clean_data, BCSS, augment=False)
    labels = train_set.labels.numpy().astype(int)
    train = report.splits["train"]
    assert train.tiles == 6 and train.sizes == {(SIZE, SIZE): 6}
    assert train.positives.tolist() == labels.sum(axis=0).tolist()
    assert dict(train.labels_per_tile) == dict(zip(*np.unique(labels.sum(axis=1), return_counts=True)))
    for split in ("val", "test"):
        masks = [read_mask(p, BCSS) for p in EvalDataset(clean_data, split, BCSS).mask_paths]
        expected = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=5)
        assert report.splits[split].class_pixels.tolist() == expected.tolist()
    summary = report.summary()
    assert "train positives per class: " + ", ".join(f"{n} {c}" for n, c in zip(BCSS.names, labels.sum(0))) in summary
    assert "val mask pixels: TUM" in summary


def test_other_sizes_and_formats_train_evaluate_and_export(clean_data, tmp_path):
    root = mixed_data(clean_data, tmp_path)
    work_dir = tmp_path / "run"
    config = config_for(root, work_dir)
    report = check_config_data(config, progress=False)
    assert report.problems == [] and report.splits["train"].sizes[(80, 80)] == 1
    assert "2 train tiles are not 64×64" in report.summary()

    clean = TrainDataset(clean_data, BCSS, augment=False)
    mixed = TrainDataset(root, BCSS, augment=False, tile_size=SIZE)
    assert [p.suffix for p in mixed.paths].count(".jpg") == 1 and len(mixed) == len(clean)
    assert torch.equal(mixed.labels, clean.labels)  # labels read from .jpg/.tif/.bmp names as from .png
    assert all(mixed[i]["image"].shape == (3, SIZE, SIZE) for i in range(len(mixed)))

    result = train(config, DistInfo(device=torch.device("cpu")))  # validates on 96, 64 and 64 px images
    assert result.iterations == 2 and 0.0 <= result.best_miou <= 100.0

    model = load_trained_model(config, work_dir / "latest.pth", torch.device("cpu"))
    test_set = EvalDataset(root, "test", BCSS)
    sizes = {tuple(test_set[i]["image"].shape[-2:]) for i in range(len(test_set))}
    assert sizes == {(48, 48), (SIZE, SIZE)}
    with Predictor(model, config, torch.device("cpu"), tta=False, crf=False) as predictor:
        metrics = evaluate_split(predictor, test_set, config, ("predicted",))["predicted"]
    pixels = sum(test_set[i]["mask"].numel() for i in range(len(test_set)))
    assert int(np.asarray(metrics.confusion).sum()) == pixels  # every image scored against its own mask

    out = tmp_path / "masks"
    args = export_command.build_parser().parse_args(
        ["--config", str(work_dir / "config.yaml"), "--checkpoint", str(work_dir / "latest.pth"), "--device", "cpu",
         "--split", "train", "--out-dir", str(out), "--no-crf", "--no-tta"])
    export_command.main(args)
    for path in TrainDataset(root, BCSS, augment=False).paths:  # pseudo-masks at each tile's own size
        with Image.open(path) as tile, Image.open(out / f"{path.stem}.png") as mask:
            assert mask.size == tile.size, path


def test_label_layouts_with_other_formats_and_a_semicolon_csv(clean_data, tmp_path):
    root = copy_data(clean_data, tmp_path)
    tiles = sorted((root / "train").glob("*.png"))
    clean = TrainDataset(clean_data, BCSS, augment=False)
    spaced = []
    for tile in tiles[:2]:  # LUAD-HistoSeg's "[1 0 0 1]" names, as TIFF
        bits = tile.stem[tile.stem.rindex("[") + 1:-1]
        target = tile.with_name(tile.stem.replace(f"[{bits}]", f"[{' '.join(bits)}]") + ".tiff")
        spaced.append(resave(tile, ".tiff").rename(target))
    assert all("[" in p.name and " " in p.name for p in spaced)
    assert torch.equal(TrainDataset(root, BCSS, augment=False).labels, clean.labels)

    plain = tmp_path / "plain"
    (plain / "train").mkdir(parents=True)
    shutil.copytree(root / "val", plain / "val")
    rows = []
    for index, tile in enumerate(sorted((root / "train").iterdir())):
        name = f"tile{index}.jpeg"
        Image.open(tile).convert("RGB").save(plain / "train" / name, quality=95)
        rows.append(f"{name};" + ";".join(str(int(v)) for v in clean.labels[index]))
    (plain / "labels.csv").write_text("filename;" + ";".join(BCSS.names) + "\n" + "\n".join(rows) + "\n",
                                      encoding="utf-8")
    from_csv = TrainDataset(plain, BCSS, augment=False, label_csv="labels.csv")
    assert torch.equal(from_csv.labels, clean.labels)


def test_mixed_sizes_are_batched_by_size():
    items = [{"image": torch.zeros(3, h, h), "name": str(i)} for i, h in enumerate((64, 96, 64, 48))]
    groups = collate_same_size(items)
    assert [g["image"].shape[0] for g in groups] == [2, 1, 1]
    assert [list(g["name"]) for g in groups] == [["0", "2"], ["1"], ["3"]]


def test_prompt_check_counts_every_class_region(clean_data, tmp_path, capsys):
    dataset = EvalDataset(clean_data, "val", BCSS)
    min_share = 0.1
    expected = np.zeros(BCSS.num_classes, int)
    for i in range(len(dataset)):
        shares = np.bincount(dataset[i]["mask"].numpy().ravel(), minlength=5)[:4] / SIZE**2
        expected += shares >= min_share
    out = tmp_path / "prompts.json"
    args = check_prompts_command.build_parser().parse_args(
        ["--config", str(DEMO_RANDOM), "--device", "cpu", "--min-share", str(min_share), "--out", str(out),
         "--warn-below", "1.01", "--opts", f"data.root={clean_data}", f"model.image_size={SIZE}"])
    check_prompts_command.main(args)
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    confusion = np.array(record["confusion"])
    assert confusion.sum(axis=1).tolist() == expected.tolist()  # one view per class region of each tile
    for c, name in enumerate(BCSS.names):
        if expected[c]:
            assert record["accuracy"][name] == pytest.approx(confusion[c, c] / expected[c])
            assert f"warning: {name}: " in printed  # every class is below a threshold above 100%
    assert "docs/ablation.md" in printed and "loss.sim_weight" in printed


def test_prompt_check_image_views_match_the_class_regions():
    torch.manual_seed(0)
    from construct.models.conch import load_conch

    conch = load_conch(None, image_size=SIZE, preset="tiny").eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    masks = torch.full((2, SIZE, SIZE), 4)
    masks[0, :, :40] = 0  # TUM 62.5 %
    masks[0, :, 40:] = 2  # LYM 37.5 %
    masks[1, :2] = 3  # NEC 3 %: below min_share
    for views in ("image", "tokens"):
        result = check_prompts(conch, BCSS.prompts, BCSS.names, [(images, masks)], min_share=0.05, views=views)
        assert result.regions.tolist() == [1, 0, 1, 0] and result.images == 2
