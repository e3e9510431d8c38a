"""Config loading: defaults, strict keys with suggestions, types, overrides, _base_ chains."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from support import DEMO, DEMO_RANDOM, REPO

from construct.config import Config, config_to_dict, load_config, save_config
from construct.errors import ConfigError


def write(path: Path, data: dict) -> Path:
    """A config file on the BCSS-WSSS preset (the class set every config needs), unless it names its own."""
    if "_base_" not in data and "classes" not in data.get("data", {}):
        data = {"_base_": str(REPO / "configs/datasets/bcss_wsss.yaml"), **data}
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_load():
    bcss = load_config(REPO / "configs/bcss.yaml")
    assert bcss.work_dir == "work_dirs/bcss/construct"
    assert (bcss.loss.cls_weight, bcss.loss.struct_weight, bcss.loss.sim_weight) == (1.0, 1.5, 0.2)
    assert bcss.train.lr == 2e-5 and bcss.train.batch_size == 10 and bcss.train.seed == 42
    no_distill = load_config(REPO / "configs/bcss_no_distill.yaml")
    assert no_distill.loss.struct_weight == 0.0
    assert no_distill.train == bcss.train  # only what the override names changes
    demo = load_config(DEMO_RANDOM)
    assert demo.model.conch.checkpoint is None and demo.model.conch.preset == "tiny"
    testbed = load_config(DEMO)
    assert testbed.testbed.seed == 0 and testbed.model.teacher.checkpoint == "pretrained_models/testbed/seed0/mit"


@pytest.mark.parametrize("override, key", [
    ("model.teacher.checkpoint=elsewhere/mit", "model.teacher.checkpoint"),
    ("model.conch.checkpoint=pretrained_models/testbed/seed0/conch.pth", "model.conch.checkpoint"),
    ("model.conch.preset=vit_b16", "testbed.seed"),
])
def test_testbed_towers_must_be_the_testbed_layout(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_empty_file_asks_for_a_class_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"'data\.classes' needs at least 2 tissue classes"):
        load_config(path)
    on_preset = load_config(write(tmp_path / "d.yaml", {}))
    assert dataclasses.replace(on_preset, data=Config().data) == Config()  # everything else takes its default


def test_unknown_key_names_file_and_dotted_key_with_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"batch_szie": 4}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "train.batch_szie" in message and "train.batch_size" in message
    assert "\n" not in message


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(write(tmp_path / "c.yaml", {"modle": {}}))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"batch_size": "ten"}}, "train.batch_size"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"loss": {"threshold_max": "per_pixel"}}, "loss.threshold_max"),
        ({"model": {"cam_levels": 3}}, "model.cam_levels"),
        ({"model": {"conch": "weights.bin"}}, "model.conch"),
        ({"data": {"root": None}}, "data.root"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path / "c.yaml", data))


def test_fast_path_switches_default_off_and_take_booleans_only(tmp_path):
    path = write(tmp_path / "c.yaml", {})
    config = load_config(path)
    assert config.train.fast_path is False and config.inference.fast_path is False  # until the GPU check shows a match
    config = load_config(path, ["train.fast_path=true", "inference.fast_path=true"])
    assert config.train.fast_path is True and config.inference.fast_path is True
    for key in ("train.fast_path", "inference.fast_path"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
            load_config(path, [f"{key}=reduce-overhead"])
        assert "\n" not in str(error.value)


def test_int_accepted_for_float_and_null_for_optional(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", {"train": {"lr": 1, "max_iters": None}}))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.max_iters is None


def test_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"batch_size": 10}})
    config = load_config(path, ["train.batch_size=4", "data.root=/x", "model.conch.checkpoint=null",
                                "inference.tta_factors=[1.0]", "testbed.dataset.train=5"])
    assert config.train.batch_size == 4
    assert config.data.root == "/x"
    assert config.model.conch.checkpoint is None
    assert config.inference.tta_factors == [1.0]
    assert config.testbed.dataset is not None and config.testbed.dataset.train == 5


def test_override_errors(tmp_path):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.batch_size"])
    with pytest.raises(ConfigError, match="train.bach_size"):
        load_config(path, ["train.bach_size=3"])


def test_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.distill_pairs\[0\]"):
        load_config(write(tmp_path / "a.yaml", {"model": {"cam_levels": [2], "distill_pairs": [[3, 3]]}}))
    with pytest.raises(ConfigError, match="model.cam_level_weights"):
        load_config(write(tmp_path / "b.yaml", {"model": {"cam_levels": [2, 3], "cam_level_weights": [1.0]}}))
    with pytest.raises(ConfigError, match="model.image_size"):
        load_config(write(tmp_path / "c.yaml", {"model": {"image_size": 200}}))
    with pytest.raises(ConfigError, match="data.classes"):
        load_config(write(tmp_path / "d.yaml", {"data": {"classes": [{"name": "A", "prompt": "a", "color": [1, 2, 3]}]}}))


def test_tta_mode_and_factors(tmp_path):
    path = write(tmp_path / "c.yaml", {})
    assert load_config(path).inference.tta == "intensity"  # the authors' TTA: what the paper's numbers used
    with pytest.raises(ConfigError) as info:
        load_config(path, ["inference.tta=multiscale"])
    message = str(info.value)
    assert "'inference.tta'" in message and "multiscale" in message and "resize" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"inference\.tta_factors.*positive"):
        load_config(path, ["inference.tta_factors=[0.9, 0.0]"])
    with pytest.raises(ConfigError, match=r"inference\.tta_factors.*at least one"):
        load_config(path, ["inference.tta_factors=[]"])
    # Resize averages CAMs on the unscaled grid, so it needs 1.0; intensity does not.
    with pytest.raises(ConfigError, match=r"inference\.tta_factors.*1\.0"):
        load_config(path, ["inference.tta=resize", "inference.tta_factors=[0.9, 1.1]"])
    assert load_config(path, ["inference.tta_factors=[0.9, 1.1]"]).inference.tta_factors == [0.9, 1.1]


def test_base_chain_and_missing_base(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"batch_size": 3, "lr": 0.5}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "train": {"lr": 0.1}})
    config = load_config(child)
    assert config.train.batch_size == 3 and config.train.lr == 0.1
    orphan = write(tmp_path / "orphan.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(orphan)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    config = load_config(REPO / "configs/bcss.yaml", ["train.batch_size=3"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(config)


def test_config_reference_is_current():
    from construct_lab.config_reference import OUTPUT, render

    assert OUTPUT.read_text(encoding="utf-8") == render(), "run: python -m construct_lab.config_reference"
