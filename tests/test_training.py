"""main.py / the training engine on tiny presets: checkpoints, resume equality, NaN guard, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import BCSS, DEMO_RANDOM, REPO

import construct.engine.objective as objective_module
import construct.engine.trainer as trainer_module
from construct.checkpoint import load_checkpoint
from construct.config import load_config
from construct.engine.distributed import DistInfo
from construct.engine.trainer import TrainingError, train
from construct.errors import ConfigError
from construct_lab.synthetic.tiles import generate_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_dataset(root, n_train=24, n_val=4, n_test=4, seed=3, classes=BCSS, size=64)
    return root


def small_config(data_root: Path, work_dir: Path, *overrides: str):
    return load_config(DEMO_RANDOM, [
        f"data.root={data_root}", "testbed.dataset=null", "data.num_workers=0", f"work_dir={work_dir}",
        "model.image_size=64", "train.batch_size=4", "train.max_iters=6", "train.eval_interval=3",
        "train.log_interval=1", "inference.batch_size=4", *overrides,
    ])


CPU = DistInfo(device=torch.device("cpu"))


def test_training_writes_run_folder(data_root, tmp_path, capsys):
    result = train(small_config(data_root, tmp_path / "run"), CPU)
    run = tmp_path / "run"
    assert result.iterations == 6
    for name in ("config.yaml", "latest.pth", "best.pth", "log.jsonl"):
        assert (run / name).is_file(), name
    checkpoint = load_checkpoint(run / "latest.pth")
    assert checkpoint["iteration"] == 6
    assert not any(key.startswith("conch.") for key in checkpoint["model"])
    assert checkpoint["config"]["work_dir"] == str(run)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [3, 6]
    assert {"cls", "struct", "sim", "total", "lr"} <= set(records[0])
    assert 0.0 <= records[-1]["miou"] <= 100.0 and "cls_accuracy" in records[-1]
    best = load_checkpoint(run / "best.pth")
    assert best["best"]["iteration"] in (3, 6)
    out = capsys.readouterr().out
    assert "trainable" in out and "adapters" in out


def test_sim_warmup_keeps_sim_off_for_its_share_of_the_iterations(data_root, tmp_path):
    train(small_config(data_root, tmp_path / "run", "loss.sim_warmup=0.5"), CPU)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    with_sim = {r["iteration"]: "sim" in r for r in records if r["kind"] == "train"}
    assert with_sim == {1: False, 2: False, 3: False, 4: True, 5: True, 6: True}
    assert all(r["sim"] > 0 for r in records if r["kind"] == "train" and "sim" in r)
    with pytest.raises(ConfigError, match="loss.sim_warmup"):
        small_config(data_root, tmp_path / "bad", "loss.sim_warmup=1.0")


def test_resumed_run_ends_with_the_same_weights(data_root, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(small_config(data_root, reference), CPU)

    interrupted = tmp_path / "interrupted"
    real_save = trainer_module.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(state, path):
        real_save(state, path)
        if Path(path).name == "latest.pth" and state["iteration"] == 3:
            raise Crash

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(small_config(data_root, interrupted), CPU)
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    assert load_checkpoint(interrupted / "latest.pth")["iteration"] == 3
    train(small_config(data_root, interrupted), CPU, resume=interrupted / "latest.pth")

    expected = load_checkpoint(reference / "latest.pth")
    resumed = load_checkpoint(interrupted / "latest.pth")
    assert resumed["iteration"] == 6
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in expected["objective"].items():
        assert torch.equal(value, resumed["objective"][key]), key


def test_existing_run_needs_resume_or_overwrite(data_root, tmp_path):
    config = small_config(data_root, tmp_path / "run", "train.max_iters=3")
    train(config, CPU)
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        train(config, CPU)
    assert train(config, CPU, overwrite=True).iterations == 3


def test_resume_rejects_a_checkpoint_of_another_model(data_root, tmp_path):
    from construct.errors import CheckpointError

    first = small_config(data_root, tmp_path / "a", "train.max_iters=3")
    train(first, CPU)
    other = small_config(data_root, tmp_path / "b", "train.max_iters=3", "model.prototypes_per_class=2")
    with pytest.raises(CheckpointError, match="prototypes.prototypes"):
        train(other, CPU, resume=tmp_path / "a" / "latest.pth")


@pytest.fixture
def nan_at_third_step(monkeypatch) -> dict[str, int]:
    """Make the classification loss NaN on its third call; returns the call counter."""
    calls = {"n": 0}
    real_loss = objective_module.classification_loss

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real_loss(logits, labels)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(objective_module, "classification_loss", poisoned)
    return calls


def test_nan_loss_stops_naming_the_iteration_and_keeps_last_checkpoint(data_root, tmp_path, nan_at_third_step):
    config = small_config(data_root, tmp_path / "run", "train.checkpoint_interval=1")
    with pytest.raises(TrainingError, match="iteration 3"):
        train(config, CPU)
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 2


def test_deferred_nan_guard_stops_at_the_next_sync_naming_the_first_bad_iteration(data_root, tmp_path,
                                                                                  nan_at_third_step, capsys):
    """train.fast_path checks the loss on the device and reads it at log/validation/checkpoint
    iterations only; on the CPU that is the one part of the fast path that applies."""
    calls = nan_at_third_step
    config = small_config(data_root, tmp_path / "run", "train.fast_path=true", "train.checkpoint_interval=2",
                          "train.log_interval=5", "train.eval_interval=6")
    with pytest.raises(TrainingError, match=r"loss is not finite at iteration 3 \(cls=nan, .*latest\.pth"):
        train(config, CPU)
    assert calls["n"] == 4  # iteration 4 ran: the check waited for the checkpoint iteration
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 2
    assert not (tmp_path / "run" / "best.pth").exists()
    assert "note: train.fast_path on cpu" in capsys.readouterr().out


def _reference_cpu_run(config, iterations: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """The CPU training loop as it was before the fast path: plain AdamW, fp32, the poly schedule,
    the same data order. Returns each step's losses and the trainable state at the end."""
    from torch.utils.data import DataLoader

    from construct.data.datasets import train_dataset
    from construct.engine.data import ResumableSampler, SeededAugmentation
    from construct.engine.objective import ConStructObjective
    from construct.models.build import build_model, build_teacher

    train_cfg = config.train
    dataset = train_dataset(config, augment=False)
    sampler = ResumableSampler(len(dataset), train_cfg.batch_size, train_cfg.seed)
    loader = DataLoader(SeededAugmentation(dataset, train_cfg.seed), batch_size=train_cfg.batch_size, sampler=sampler)
    model = build_model(config, "cpu")
    objective = ConStructObjective(model, build_teacher(config, "cpu"), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay, betas=tuple(train_cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, trainer_module.poly_lambda(iterations, train_cfg.poly_power))
    model.train()
    seen = []
    for batch in loader:
        losses = objective(batch["image"], batch["label"])
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        seen.append({name: float(value.detach()) for name, value in losses.items()})
        if len(seen) == iterations:
            break
    return seen, model.trainable_state_dict()


@pytest.mark.parametrize("fast_path", ["false", "true"])
def test_cpu_training_is_the_plain_fp32_loop_whatever_the_switch(data_root, tmp_path, fast_path):
    config = small_config(data_root, tmp_path / "run", "train.max_iters=3", f"train.fast_path={fast_path}")
    torch.manual_seed(0)  # DataLoader iterators draw their base seed from the global generator
    train(config, CPU)
    torch.manual_seed(0)
    expected_losses, expected_state = _reference_cpu_run(config, 3)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = [{name: r[name] for name in expected_losses[0]} for r in records if r["kind"] == "train"]
    assert logged == expected_losses
    state = load_checkpoint(tmp_path / "run" / "latest.pth")["model"]
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key


def run_main(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_main_cli_errors_are_one_line(tmp_path):
    result = run_main("main.py", "--config", str(DEMO_RANDOM), "--device", "cpu", "--opts", "train.bach_size=2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {DEMO_RANDOM} with --opts: unknown key 'train.bach_size' (did you mean 'train.batch_size'?)"
    ]
    result = run_main("main.py", "--config", str(DEMO_RANDOM), "--gpu", "0")
    assert result.returncode == 2 and "no usable CUDA device" in result.stderr and "Traceback" not in result.stderr


def test_two_process_gloo_training(data_root, tmp_path):
    work_dir = tmp_path / "ddp"
    result = run_main(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", "--config", str(DEMO_RANDOM),
        "--device", "cpu", "--opts", f"data.root={data_root}", "testbed.dataset=null", "data.num_workers=0",
        f"work_dir={work_dir}", "model.image_size=64", "train.batch_size=2", "train.max_iters=3",
        "train.eval_interval=3", "inference.batch_size=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(work_dir / "latest.pth")
    assert checkpoint["iteration"] == 3
    assert result.stdout.count("done: 3 iterations") == 1  # only rank 0 reports and writes
