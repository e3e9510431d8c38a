"""Image/mask I/O, dataset layout checks, augmentation and the synthetic generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from support import BCSS

from construct.data import (
    EvalDataset,
    ImageFolderDataset,
    TrainDataset,
    flip_rotate,
    read_image,
    read_mask,
    resolve_split_dir,
    write_image,
    write_mask,
)
from construct.errors import DataError
from construct_lab.synthetic.tiles import MANIFEST, generate_dataset, main, make_tile, tile_rng

RNG = np.random.default_rng(0)


def _rgb(h: int = 8, w: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)
    return path


def _eval_split(root: Path, split: str = "val", n: int = 2, size: int = 8) -> None:
    for i in range(n):
        _save(root / split / "img" / f"t{i}.png", _rgb(size, size))
        write_mask(root / split / "mask" / f"t{i}.png", np.full((size, size), i % 5, np.uint8), BCSS)


# --- io ------------------------------------------------------------------------------------


def test_rgb_round_trip_and_no_temp_files_left(tmp_path: Path) -> None:
    image = _rgb()
    write_image(tmp_path / "a.png", image)
    assert np.array_equal(read_image(tmp_path / "a.png"), image)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_grey_and_palette_images_become_rgb(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    out = read_image(_save(tmp_path / "g.png", grey))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], grey) for c in range(3))
    pal = read_image(_save(tmp_path / "p.png", _rgb(), mode="P"))
    assert pal.shape == (8, 8, 3)


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (100, 50, 0)
    rgba[0, :, 3] = (255, 0, 128)
    out = read_image(_save(tmp_path / "a.png", rgba))
    assert out[0, 0].tolist() == [100, 50, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2].astype(int) - [177, 152, 127]).max() <= 1


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_files_raise_data_error_naming_them(tmp_path: Path, kind: str) -> None:
    good = _save(tmp_path / "good.png", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bad = tmp_path / f"{kind}.png"
    data = {"garbage": b"not a png at all", "truncated": good.read_bytes()[: good.stat().st_size // 2], "empty": b""}
    bad.write_bytes(data[kind])
    for reader in (read_image, lambda path: read_mask(path, BCSS)):
        with pytest.raises(DataError, match=f"{kind}.png"):
            reader(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_16bit_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(deep)
    with pytest.raises(DataError, match="deep.png"):
        read_image(deep)


def test_mask_round_trip_uses_the_project_palette(tmp_path: Path) -> None:
    mask = RNG.integers(0, 5, (7, 9), dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask, BCSS)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P"
        assert img.getpalette()[:15] == [v for rgb in BCSS.palette for v in rgb]
    assert np.array_equal(read_mask(tmp_path / "m.png", BCSS), mask)
    grey = _save(tmp_path / "l.png", mask)  # an 'L' mask is accepted too
    assert np.array_equal(read_mask(grey, BCSS), mask)


def test_mask_with_invalid_value_names_file_and_values(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0], mask[1, 1] = 7, 200
    path = _save(tmp_path / "bad_mask.png", mask)
    with pytest.raises(DataError, match=r"bad_mask\.png.*7, 200"):
        read_mask(path, BCSS)


def test_rgb_mask_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="rgb_mask.png"):
        read_mask(_save(tmp_path / "rgb_mask.png", _rgb()), BCSS)


def test_write_mask_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.full((2, 2), 5), BCSS)
    assert not any(tmp_path.iterdir())


# --- layout ----------------------------------------------------------------------------------


def test_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*expected"):
        resolve_split_dir(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"test.*expected"):
        resolve_split_dir(tmp_path, "test")
    _save(tmp_path / "test" / "img" / "a.png", _rgb())
    with pytest.raises(DataError, match=r"mask.*not found"):
        resolve_split_dir(tmp_path, "test")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no tiles"):
        resolve_split_dir(tmp_path, "train")
    (tmp_path / "test" / "img").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no tiles"):
        resolve_split_dir(tmp_path, "test")


def test_valid_spelling_and_ambiguity(tmp_path: Path) -> None:
    _eval_split(tmp_path, "valid")
    assert resolve_split_dir(tmp_path, "val") == tmp_path / "valid"
    assert resolve_split_dir(tmp_path, "valid") == tmp_path / "valid"
    assert len(EvalDataset(tmp_path, "val", BCSS)) == 2
    _eval_split(tmp_path, "val")
    with pytest.raises(DataError, match="both"):
        resolve_split_dir(tmp_path, "val")


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split"):
        resolve_split_dir(tmp_path, "training")


# --- datasets --------------------------------------------------------------------------------


def test_train_dataset_items_and_bad_label_at_construction(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "b+0[0110].png", _rgb(4, 6))
    _save(tmp_path / "train" / "a+0[1 0 0 1].png", _rgb(4, 6))
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    ds = TrainDataset(tmp_path, BCSS, augment=False)
    assert [ds[i]["name"] for i in range(len(ds))] == ["a+0[1 0 0 1]", "b+0[0110]"]  # sorted
    item = ds[1]
    assert item["image"].shape == (3, 4, 6) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].tolist() == [0, 1, 1, 0]
    _save(tmp_path / "train" / "c+0[012].png", _rgb())
    with pytest.raises(DataError, match=r"c\+0\[012\]\.png"):
        TrainDataset(tmp_path, BCSS)


def test_eval_dataset_items(tmp_path: Path) -> None:
    _save(tmp_path / "test" / "img" / "x.png", _rgb(4, 4))
    write_mask(tmp_path / "test" / "mask" / "x.png", np.array([[0, 2], [4, 4]]).repeat(2, 0).repeat(2, 1), BCSS)
    item = EvalDataset(tmp_path, "test", BCSS)[0]
    assert item["name"] == "x"
    assert item["image"].shape == (3, 4, 4)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (4, 4)
    assert item["presence"].tolist() == [1, 0, 1, 0]


def test_missing_mask(tmp_path: Path) -> None:
    _eval_split(tmp_path, "test")
    (tmp_path / "test" / "mask" / "t1.png").unlink()
    with pytest.raises(DataError, match=r"mask.*t1\.png"):
        EvalDataset(tmp_path, "test", BCSS)


def test_size_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "val" / "img" / "x.png", _rgb(8, 8))
    write_mask(tmp_path / "val" / "mask" / "x.png", np.zeros((8, 6), np.uint8), BCSS)
    ds = EvalDataset(tmp_path, "val", BCSS)
    with pytest.raises(DataError, match=r"x\.png.*does not match"):
        ds[0]


def test_image_folder_dataset(tmp_path: Path) -> None:
    _save(tmp_path / "in" / "b.jpg", _rgb())
    _save(tmp_path / "in" / "a.png", _rgb())
    _save(tmp_path / "extra.png", _rgb(3, 5))
    ds = ImageFolderDataset([tmp_path / "in", tmp_path / "extra.png"])
    assert [ds[i]["name"] for i in range(len(ds))] == ["a", "b", "extra"]
    assert ds[2]["image"].shape == (3, 3, 5)
    _save(tmp_path / "other" / "a.png", _rgb())
    with pytest.raises(DataError, match="share the name"):
        ImageFolderDataset([tmp_path / "in", tmp_path / "other"])
    with pytest.raises(DataError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


# --- augmentation ----------------------------------------------------------------------------


def test_augmentation_is_identical_on_image_and_mask() -> None:
    h, w = 4, 6
    mask = torch.arange(h * w).reshape(h, w)
    image = torch.stack([mask, -mask, 2 * mask]).float()
    outcomes = set()
    torch.manual_seed(0)
    for _ in range(200):
        out_image, out_mask = flip_rotate(image, mask)
        assert torch.equal(out_image[0].long(), out_mask)
        assert torch.equal(out_image[1], -out_image[0]) and torch.equal(out_image[2], 2 * out_image[0])
        assert sorted(out_mask.flatten().tolist()) == list(range(h * w))  # a permutation
        outcomes.add(tuple(out_mask.flatten().tolist()))
    assert len(outcomes) == 8  # the whole dihedral group shows up
    image_only, none = flip_rotate(image)
    assert none is None and image_only.shape[0] == 3


# --- synthetic generator ---------------------------------------------------------------------


def test_tiles_have_varied_labels_and_distinct_class_colours() -> None:
    counts, sizes, colour_sum, colour_n = np.zeros(5), [], np.zeros((5, 3)), np.zeros(5)
    for i in range(60):
        image, mask = make_tile(tile_rng(1, "train", i), size=96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and mask.shape == (96, 96)
        present = np.bincount(mask.ravel(), minlength=5) > 0
        assert present[:4].any()
        counts += present
        sizes.append(present[:4].sum())
        for c in np.flatnonzero(present):
            colour_sum[c] += image[mask == c].mean(0)
            colour_n[c] += 1
    assert (counts[:4] >= 15).all(), counts  # every tissue class is common
    assert 1 in sizes and max(sizes) >= 3  # single- and multi-class tiles
    means = colour_sum / colour_n[:, None]
    gaps = [np.abs(means[a] - means[b]).sum() for a in range(5) for b in range(a + 1, 5)]
    assert min(gaps) > 40, means  # classes differ in average colour, not only texture


def test_make_tile_is_deterministic() -> None:
    a, b = make_tile(tile_rng(3, "val", 5), 64), make_tile(tile_rng(3, "val", 5), 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = make_tile(tile_rng(4, "val", 5), 64)
    assert not np.array_equal(a[0], c[0])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    generate_dataset(out, n_train=4, n_val=2, n_test=3, seed=7, classes=BCSS, size=64)
    return out


def test_generated_layout_reads_back(synthetic: Path) -> None:
    train = TrainDataset(synthetic, BCSS, augment=True)
    assert len(train) == 4
    for i, path in enumerate(train.paths):
        match = re.search(r"_xmin(\d+)_ymin(\d+)_", path.name)
        index = int(match[2]) // 64 * 8 + int(match[1]) // 64  # tiles fill an 8×8 slide grid
        _, mask = make_tile(tile_rng(7, "train", index), 64)
        assert train.labels[i].tolist() == (np.bincount(mask.ravel(), minlength=5)[:4] > 0).tolist()
        assert path.name.startswith("SYN-0001_") and path.name.endswith("].png")
        assert train[i]["image"].shape == (3, 64, 64)
    for split, n in (("val", 2), ("test", 3)):
        ds = EvalDataset(synthetic, split, BCSS)
        assert len(ds) == n
        item = ds[0]
        assert item["mask"].shape == (64, 64)
        with Image.open(synthetic / split / "mask" / f"{item['name']}.png") as img:
            assert img.mode == "P"
        _, mask = make_tile(tile_rng(7, split, 0), 64)
        assert torch.equal(item["mask"], torch.from_numpy(mask).long())
    names = {p.name.split("_")[0] for p in synthetic.rglob("*.png")}
    assert names == {"SYN-0001", "SYN-0002", "SYN-0003"}  # one fake slide per split
    assert json.loads((synthetic / MANIFEST).read_text())["seed"] == 7


def test_generation_is_deterministic_per_seed(synthetic: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "again", 4, 2, 3, seed=7, classes=BCSS, size=64)
    generate_dataset(tmp_path / "other", 4, 2, 3, seed=8, classes=BCSS, size=64)
    files = sorted(p.relative_to(synthetic) for p in synthetic.rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.png"))
    assert all((synthetic / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    other = sorted((tmp_path / "other" / "val" / "img").iterdir())
    assert other[0].read_bytes() != (synthetic / "val" / "img" / other[0].name).read_bytes()


def test_manifest_skip_and_refusals(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stamp = {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")}
    generate_dataset(synthetic, 4, 2, 3, seed=7, classes=BCSS, size=64)
    assert "skipping" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")} == stamp
    with pytest.raises(DataError, match="other arguments"):
        generate_dataset(synthetic, 5, 2, 3, seed=7, classes=BCSS, size=64)
    args = ["--out", str(synthetic), "--train", "4", "--val", "2", "--test", "3", "--seed", "8", "--size", "64"]
    assert main(args) == 1
    assert "refusing" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        generate_dataset(foreign, 1, 1, 1, seed=0, classes=BCSS, size=64)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_incomplete_dataset_and_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--out", str(empty), "--train", "1", "--val", "1", "--test", "1", "--seed", "0", "--size", "64"]) == 0
    assert (empty / MANIFEST).is_file()
    next((empty / "test" / "mask").iterdir()).unlink()
    with pytest.raises(DataError, match="missing files"):
        generate_dataset(empty, 1, 1, 1, seed=0, classes=BCSS, size=64)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no staging folder left behind
