"""The testbed: pretrained tiny towers in the real files' layout, deterministic, cached, and better
than random towers at what L_sim assumes; the generator's second style."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import BCSS

from construct.data.synthetic import STYLES, generate_dataset, make_tile
from construct.errors import ConfigError
from construct.models.conch import load_conch
from construct.models.segformer import load_mit_teacher
from construct.tools.testbed.premises import pure_tiles, zero_shot_accuracy
from construct.tools.testbed.pretrain import Budget, ensure_testbed, pretrain_conch, read_manifest, tower_paths

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
    with pytest.raises(ConfigError, match="not this testbed"):
        ensure_testbed(folder, seed=4, prompts=BCSS.prompts, budget=TINY, log=messages.append)


def test_pretraining_is_deterministic_for_a_seed():
    first = pretrain_conch(5, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    second = pretrain_conch(5, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    other = pretrain_conch(6, TINY, BCSS.prompts, log=lambda _: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual.proj_contrast"], other["visual.proj_contrast"])


def test_a_briefly_pretrained_conch_beats_a_random_one_at_zero_shot():
    budget = Budget(conch_steps=30, conch_batch=24, conch_size=64, pure_per_class=6, mixed_tiles=6)
    pretrained = pretrain_conch(0, budget, BCSS.prompts, log=lambda _: None)
    torch.manual_seed(0)
    random_tower = load_conch(None, preset="tiny")
    tiles = pure_tiles(seed=0, per_class=6, size=96)
    trained_accuracy = zero_shot_accuracy(pretrained, BCSS.prompts, tiles)
    random_accuracy = zero_shot_accuracy(random_tower, BCSS.prompts, tiles)
    assert trained_accuracy >= 0.6 and trained_accuracy > random_accuracy + 0.25, (trained_accuracy, random_accuracy)


def test_variant_style_differs_and_default_manifests_stay_valid(tmp_path):
    default_image, default_mask = make_tile(np.random.default_rng(1), 64)
    variant_image, variant_mask = make_tile(np.random.default_rng(1), 64, STYLES["variant"])
    assert np.array_equal(default_mask, variant_mask)  # same regions, other stain and scale
    assert np.abs(default_image.astype(int) - variant_image.astype(int)).mean() > 10
    generate_dataset(tmp_path / "default", 1, 1, 1, seed=0, classes=BCSS, size=32)
    assert "style" not in (tmp_path / "default" / "synthetic.json").read_text()
    generate_dataset(tmp_path / "variant", 1, 1, 1, seed=0, classes=BCSS, size=32, style="variant")
    assert '"style": "variant"' in (tmp_path / "variant" / "synthetic.json").read_text()
