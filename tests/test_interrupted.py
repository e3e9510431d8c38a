"""Interrupted CPU training runs (issue 7.2-7.4), each a real ``main.py`` process on the tiny presets.

Faults are injected deterministically: a small launcher arms one fault, then runs ``main.py`` as
``__main__``. ``kill-during-save:N`` writes half of the iteration-N ``latest.pth.tmp`` and SIGKILLs
the process; ``kill-mid-iteration:N`` SIGKILLs it inside iteration N's forward pass (between two
checkpoints); ``nan-loss:N`` makes iteration N's loss NaN. After a kill, ``latest.pth`` must load,
``--resume`` must continue from it, and the final weights must equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import BCSS, DEMO_RANDOM, REPO

from construct.checkpoint import load_checkpoint
from construct.errors import CheckpointError
from construct_lab.synthetic.tiles import generate_dataset

ITERATIONS = 8  # 8 tiles / batch 2 = 4 iterations per epoch: two epochs, validation at 4 and 8

LAUNCHER = '''
import io, os, runpy, signal, sys

import torch

kind, _, at = os.environ["CONSTRUCT_FAULT"].partition(":")
at = int(at)
if kind == "kill-during-save":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith("latest.pth.tmp") and obj.get("iteration") == at:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
else:
    from construct.engine.objective import ConStructObjective

    real_forward = ConStructObjective.forward
    calls = [0]

    def forward(self, images, labels):
        calls[0] += 1  # one call per training iteration (validation does not use the objective)
        if kind == "kill-mid-iteration" and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        losses = real_forward(self, images, labels)
        if kind == "nan-loss" and calls[0] == at:
            losses = {**losses, "total": losses["total"] * float("nan")}
        return losses

    ConStructObjective.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("interrupted")
    generate_dataset(base / "data", n_train=8, n_val=2, n_test=2, seed=0, classes=BCSS, size=64)
    launcher = base / "launch_with_fault.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    return {"data": base / "data", "launcher": launcher}


def run_main(setup: dict[str, Path], work_dir: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
    args = ["main.py", "--config", str(DEMO_RANDOM), "--device", "cpu", *flags, "--opts", f"data.root={setup['data']}",
            "testbed.dataset=null", "data.num_workers=0", f"work_dir={work_dir}", "model.image_size=64",
            "train.batch_size=2", f"train.max_iters={ITERATIONS}", "train.epochs=2",
            "train.checkpoint_interval=1", "train.log_interval=1", "inference.batch_size=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if fault is not None:
        args = [str(setup["launcher"]), *args]
        env["CONSTRUCT_FAULT"] = fault
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """An uninterrupted run: the weights every resumed run must end with."""
    work_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_main(setup, work_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: {ITERATIONS} iterations" in result.stdout
    return work_dir / "latest.pth"


def assert_same_final_state(resumed: Path, reference: Path) -> None:
    expected, got = load_checkpoint(reference), load_checkpoint(resumed)
    assert got["iteration"] == expected["iteration"] == ITERATIONS
    assert expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    for key, value in expected["objective"].items():
        assert torch.equal(value, got["objective"][key]), key


@pytest.mark.parametrize(("fault", "last_good"), [
    ("kill-during-save:6", 5),    # SIGKILL while latest.pth.tmp of iteration 6 is half written
    ("kill-mid-iteration:3", 2),  # SIGKILL inside iteration 3, after the checkpoint of iteration 2
])
def test_killed_run_resumes_to_the_same_weights(setup, reference, tmp_path, fault, last_good):
    work_dir = tmp_path / "run"
    killed = run_main(setup, work_dir, fault=fault)
    assert killed.returncode == -9, killed.stderr[-3000:]

    assert load_checkpoint(work_dir / "latest.pth")["iteration"] == last_good
    partial = work_dir / "latest.pth.tmp"
    if fault.startswith("kill-during-save"):
        assert partial.stat().st_size > 0
        with pytest.raises(CheckpointError, match="latest.pth.tmp"):
            load_checkpoint(partial)  # the half-written file is never mistaken for a checkpoint
    else:
        assert not partial.exists()

    resumed = run_main(setup, work_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done: {ITERATIONS} iterations" in resumed.stdout
    assert_same_final_state(work_dir / "latest.pth", reference)
    assert not partial.exists()  # the next write replaced the stray temporary file


def test_nan_loss_stops_the_cli_in_one_line_keeping_the_last_checkpoint(setup, tmp_path):
    work_dir = tmp_path / "run"
    result = run_main(setup, work_dir, fault="nan-loss:3")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    print(errors[0])
    assert "loss is not finite at iteration 3" in errors[0]
    assert f"The last good checkpoint is {work_dir / 'latest.pth'}" in errors[0]
    assert load_checkpoint(work_dir / "latest.pth")["iteration"] == 2


def test_existing_run_is_not_overwritten_without_resume_or_overwrite(setup, reference):
    before = reference.read_bytes()
    result = run_main(setup, reference.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    print(lines[-1])
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(reference.parent) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert reference.read_bytes() == before
