"""The testbed: pretrained tiny towers in the real files' layout, deterministic, cached, and better
than random towers at what L_sim assumes, also on tissue by a painter they never saw; the
generator's second style and its painters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import BCSS

from construct.errors import ConfigError, DataError
from construct.models.conch import load_conch
from construct.models.segformer import load_mit_teacher
from construct_lab.synthetic.tiles import PAINTERS, STYLES, generate_dataset, make_tile, paint
from construct_lab.testbed.premises import pure_tiles, zero_shot_accuracy
from construct_lab.testbed.pretrain import Budget, ensure_testbed, pretrain_conch, read_manifest, tower_paths

TINY = Budget(conch_steps=2, conch_batch=6, conch_size=32, pure_per_class=2, mixed_tiles=2,
              teacher_steps=2, teacher_batch=2, teacher_size=64, held_out=2)


def test_pretrained_files_load_strictly_through_the_real_loaders_and_are_reused(tmp_path):
    folder = tmp_path / "testbed"
    messages: list[str] = []
    manifest = ensure_testbed(folder, seed=3, prompts=BCSS.prompts, budget=TINY, log=messages.append)
    conch_file, teacher_folder = tower_paths(folder)
    state = torch.load(conch_file, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"visual", "text", "logit_scale"}
    conch = load_conch(str(conch_file), preset="tiny")  # strict: a missing or extra key would raise
    assert torch.equal(conch.logit_scale, state["logit_scale"])
    teacher = load_mit_teacher(teacher_folder, preset="tiny")
    assert sorted(p.name for p in teacher_folder.iterdir()) == ["config.json", "model.safetensors"]
    assert len(teacher(torch.rand(1, 3, 64, 64))) == 4
    assert read_manifest(folder)["seed"] == 3 and "zero_shot_accuracy_pretrained" in manifest["premises"]

    before = conch_file.stat().st_mtime_ns
    messages.clear()
    ensure_testbed(folder, seed=3, prompts=BCSS.prompts, budget=TINY, log=messages.append)
    assert conch_file.stat().st_mtime_ns == before and "reusing" in messages[0]
    with pytest.raises(ConfigError, match="towers of another seed.*kept"):
        ensure_testbed(folder, seed=4, prompts=BCSS.prompts, budget=TINY, log=messages.append)
    own = [*BCSS.prompts[:2], "Glands of the colon.", *BCSS.prompts[3:]]
    with pytest.raises(ConfigError) as info:  # one's own classes on the demo config: the prompts differ
        ensure_testbed(folder, seed=3, prompts=own, budget=TINY, log=messages.append)
    message = str(info.value)
    assert "other class prompts" in message and "prompt 3: 'Glands of the colon.'" in message
    assert "delete" not in message and "model.conch.checkpoint" in message
    assert conch_file.stat().st_mtime_ns == before


def test_pretraining_is_deterministic_for_a_seed():
    first = pretrain_conch(5, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    second = pretrain_conch(5, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    other = pretrain_conch(6, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual.proj_contrast"], other["visual.proj_contrast"])


def test_a_conch_pretrained_on_two_painters_beats_a_random_one_at_zero_shot_on_a_third():
    budget = Budget(conch_steps=60, conch_batch=24, conch_size=64, pure_per_class=12, mixed_tiles=12,
                    painters="classic,noise")
    pretrained = pretrain_conch(0, budget, BCSS.prompts, log=lambda _: None)
    torch.manual_seed(0)
    random_tower = load_conch(None, preset="tiny")
    tiles = pure_tiles(seed=0, eval_set="glands", per_class=6, size=96)  # a painter pretraining never saw
    trained_accuracy = zero_shot_accuracy(pretrained, BCSS.prompts, tiles)
    random_accuracy = zero_shot_accuracy(random_tower, BCSS.prompts, tiles)
    assert trained_accuracy >= 0.45 and trained_accuracy > random_accuracy + 0.2, (trained_accuracy, random_accuracy)


def test_painters_draw_the_same_classes_differently_and_are_recorded(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 2
    images = {name: paint(np.random.default_rng(0), mask, painter=name) for name in PAINTERS}
    assert set(images) >= {"classic", "noise", "glands"}
    for name, image in images.items():
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8, name
        assert np.array_equal(image, paint(np.random.default_rng(0), mask, painter=name)), name
    for a in images:
        for b in images:
            if a < b:
                assert np.abs(images[a].astype(int) - images[b].astype(int)).mean() > 10, (a, b)
    for name in PAINTERS:
        image, drawn = make_tile(np.random.default_rng(1), 96, painter=name)
        tissue = np.isin(drawn, range(4)).mean()
        assert image.shape == (96, 96, 3) and tissue >= 0.25 and drawn.max() <= 4, name
    generate_dataset(tmp_path / "glands", 1, 1, 1, seed=0, classes=BCSS, size=32, painter="glands")
    assert '"painter": "glands"' in (tmp_path / "glands" / "synthetic.json").read_text()
    with pytest.raises(DataError, match="unknown synthetic painter"):
        generate_dataset(tmp_path / "other", 1, 1, 1, seed=0, classes=BCSS, size=32, painter="watercolour")
    with pytest.raises(ConfigError, match="painters"):
        Budget(painters="classic,watercolour").painter_names()


def test_variant_style_differs_and_default_manifests_stay_valid(tmp_path):
    default_image, default_mask = make_tile(np.random.default_rng(1), 64)
    variant_image, variant_mask = make_tile(np.random.default_rng(1), 64, STYLES["variant"])
    assert np.array_equal(default_mask, variant_mask)  # same regions, other stain and scale
    assert np.abs(default_image.astype(int) - variant_image.astype(int)).mean() > 10
    generate_dataset(tmp_path / "default", 1, 1, 1, seed=0, classes=BCSS, size=32)
    assert "style" not in (tmp_path / "default" / "synthetic.json").read_text()
    generate_dataset(tmp_path / "variant", 1, 1, 1, seed=0, classes=BCSS, size=32, style="variant")
    assert '"style": "variant"' in (tmp_path / "variant" / "synthetic.json").read_text()
