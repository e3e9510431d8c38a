"""The GPU check: its CPU dry run end to end (so it cannot rot between GPU visits), the
largest-batch search, the time caps, failure recording and the wheels it carries."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import REPO

from construct_lab.bench import VARIANTS
from construct_lab.gpu_check.plan import check_config
from construct_lab.gpu_check.runner import Check, PartError, run_logged
from construct_lab.gpu_check.training import largest_batch, search_priority

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "construct_lab.gpu_check", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_part(tmp_path) -> None:
    out = tmp_path / "check"
    result = run_check("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every part ok" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["environment", "train_bench", "train_match", "data", "train_run", "train_run_fast", "loader",
                           "eval", "torchrun", "projection"]
    assert all(part["status"] == "ok" for part in parts.values()), parts
    assert report["ok"] and report["dry_run"]

    assert parts["environment"]["cpu_count"] == os.cpu_count()
    assert parts["environment"]["packages"]["transformers"]
    bench = parts["train_bench"]["variants"]
    assert set(bench) == set(VARIANTS)  # whatever the bench measures, the check measures
    for name, entry in bench.items():
        assert entry["overrides"] == VARIANTS[name]
        assert entry["at_batch"]["batch"] == 2 and entry["at_batch"]["seconds_per_step"] > 0
        assert all(math.isfinite(v) for v in entry["at_batch"]["losses"].values())
        fast = entry["at_batch_fast"]  # eager and fast side by side; on the CPU the fast step runs eager
        assert fast["batch"] == 2 and fast["seconds_per_step"] > 0 and fast["cuda_graphs"] == 0
        assert fast["losses"].keys() == entry["at_batch"]["losses"].keys()
    searched = [entry for entry in bench.values() if "largest_batch" in entry]
    assert len(searched) == 1 and searched[0]["largest_batch"]["batch"] == 4  # the dry run's upper end
    assert "sim" in searched[0]["at_batch"]["losses"] or "struct" in searched[0]["at_batch"]["losses"]

    match = parts["train_match"]
    assert [len(match["losses"][path]) for path in ("eager", "fast")] == [3, 3]
    assert match["match"] and match["max_relative_difference"]["total"] == 0.0  # the same CPU step twice

    for name, fast in (("train_run", False), ("train_run_fast", True)):
        run = parts[name]
        assert run["fast_path"] is fast
        assert run["iterations"] == 2 and run["num_workers"] == 1 and not run["pin_memory"]
        assert {"best.pth", "latest.pth"} <= set(run["checkpoints"])
        assert run["steady_seconds_per_iteration"] > 0 and 0 <= run["val_miou"] <= 100
    assert "train.fast_path=true" in (out / "logs" / "train_run_fast.log").read_text()
    assert parts["loader"]["images"] > 0 and parts["loader"]["images_per_s"] > 0

    settings = parts["eval"]["settings"]
    eager_settings = ["no TTA, no CRF", "TTA, no CRF", "TTA + CRF pool (2 workers)"]
    assert list(settings) == eager_settings + [f"{name}, fast path" for name in eager_settings]
    for entry in settings.values():
        assert entry["images"] == 4 and entry["images_per_s"] > 0 and entry["network_s"] > 0

    ddp = parts["torchrun"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and math.isfinite(ddp["all_reduced_loss"])

    projection = parts["projection"]
    assert projection["train_iterations"] == 2 * (23_422 // 10)
    assert projection["train_minutes"] and all(v > 0 for v in projection["train_minutes"].values())
    assert projection["test_minutes"] and all(v > 0 for v in projection["test_minutes"].values())
    assert {"main.py, default config (data loading included)",
            "main.py, default config (data loading included), fast path"} <= set(projection["train_minutes"])
    assert sum("fast path" in name for name in projection["test_minutes"]) == 2  # one and both protocols

    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("## GPU check: ")
    assert all(f"| {name} | 2 |" in markdown and f"| {name} | 2 (fast path) |" in markdown for name in VARIANTS)
    assert "Eager vs fast path" in markdown and "**match**" in markdown
    assert markdown in result.stdout  # printed as well as written


@pytest.mark.parametrize("peak", [
    lambda b: 900 + 300 * b,  # linear: found exactly in a few probes
    lambda b: 900 + 250 * b + 4 * b * b,  # grows faster than a line
    lambda b: 900 + 300 * b if b <= 18 else None,  # out of memory before the limit
])
def test_largest_batch_finds_the_largest_size_within_the_limit(peak) -> None:
    limit = 8192.0
    truth = max(b for b in range(1, 257) if peak(b) is not None and peak(b) <= limit)
    probed = []

    def measure(batch: int) -> float | None:
        probed.append(batch)
        return peak(batch)

    best, probes = largest_batch(measure, limit, {10: peak(10)}, max_batch=256, max_probes=6)
    assert best == truth
    assert len(probed) <= 6 and 10 not in probed  # the known size is not measured again
    assert all(math.isinf(probes[b]) for b in probed if peak(b) is None)


def test_largest_batch_goes_down_and_respects_the_upper_end() -> None:
    over = {10: 9000.0}  # batch 10 is already over the limit
    best, _ = largest_batch(lambda b: 500 + 850 * b, 8192.0, over, max_batch=256, max_probes=6)
    assert best == 9
    best, probes = largest_batch(lambda b: 100 + b, 8192.0, {2: 102.0}, max_batch=4)
    assert best == 4 and set(probes) == {2, 4}
    assert largest_batch(lambda b: 1e6, 8192.0, {}, max_batch=8)[0] is None


def test_searches_start_with_the_default_objective_and_end_with_cls_alone() -> None:
    order = sorted(VARIANTS, key=lambda name: search_priority(name, dry_run=True))
    default = [name for name, overrides in VARIANTS.items() if not overrides]
    assert order[:1] == default[:1]
    losses = {name: check_config(True, *VARIANTS[name]).loss for name in VARIANTS}
    cls_only = [name for name in order if losses[name].struct_weight == 0 and losses[name].sim_weight == 0]
    assert cls_only and order[-len(cls_only):] == cls_only


def test_without_cuda_the_check_is_a_one_line_error(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "check"
    result = run_check("--out", str(out), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no CUDA device") and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_parts_out_of_budget_are_skipped_and_the_exit_status_says_so(tmp_path) -> None:
    out = tmp_path / "check"
    result = run_check("--dry-run", "--budget", "1", "--out", str(out), timeout=120)
    assert result.returncode == 1
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["environment"]["status"] == "ok"
    measuring = ("train_bench", "train_match", "train_run", "train_run_fast", "loader", "eval", "torchrun")
    assert [parts[n]["status"] for n in measuring] == ["skipped"] * len(measuring)
    assert parts["projection"]["status"] == "failed" and "nothing to project" in parts["projection"]["error"]
    assert f"not ok: {', '.join(measuring)}, projection" in result.stdout


def _check(tmp_path: Path) -> Check:
    args = argparse.Namespace(dry_run=True, out=str(tmp_path / "check"), memory_gib=8.0, budget=60.0, argv=[])
    return Check(args, torch.device("cpu"))


def test_a_failed_part_is_recorded_with_what_it_measured_and_the_next_part_runs(tmp_path) -> None:
    check = _check(tmp_path)

    def fails() -> dict:
        raise PartError("no luck", {"measured": 3})

    def crashes() -> dict:
        raise KeyError("bug")

    check.record("first", fails)
    check.record("second", crashes)
    check.record("third", lambda: {"value": 1})
    parts = json.loads((tmp_path / "check" / "gpu_check.json").read_text())["parts"]
    assert parts["first"] == {"status": "failed", "error": "no luck", "measured": 3, "seconds": parts["first"]["seconds"]}
    assert parts["second"]["status"] == "failed" and "KeyError" in parts["second"]["error"]
    assert "Traceback" in (tmp_path / "check" / "logs" / "second.traceback.txt").read_text()
    assert parts["third"]["status"] == "ok" and parts["third"]["value"] == 1
    assert "| first | failed: no luck |" in (tmp_path / "check" / "gpu_check.md").read_text()


def test_a_command_past_its_cap_is_stopped_with_its_children(tmp_path) -> None:
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print('child', child.pid, flush=True); time.sleep(120)")
    log = tmp_path / "slow.log"
    started = time.monotonic()
    with pytest.raises(PartError, match="time cap of 2 s; last output: child"):
        run_logged([sys.executable, "-c", script], log, timeout=2)
    assert time.monotonic() - started < 20
    pid = int(re.search(r"child (\d+)", log.read_text()).group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # gone, or a zombie waiting for its new parent
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or re.search(r"State:\s+Z", status.read_text()):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"process {pid} outlived the cap")


def test_a_failing_command_names_its_last_line(tmp_path) -> None:
    with pytest.raises(PartError, match=r"exit status 3: error: broken \(log: "):
        run_logged([sys.executable, "-c", "import sys; print('working'); print('error: broken'); sys.exit(3)"],
                   tmp_path / "fail.log", timeout=60)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_carried_wheels_follow_the_project_pins() -> None:
    carried = _pins(REPO / "scripts" / "gpu_wheels.txt")
    required = _pins(REPO / "requirements.txt")
    shared = carried.keys() & required.keys()
    assert {"transformers", "timm", "open-clip-torch", "conch-fork"} <= shared
    assert {name: carried[name] for name in shared} == {name: required[name] for name in shared}
    assert "pydensecrf2" in required  # built by make gpu-wheels from this pin
    assert "torch" not in carried  # the GPU machine brings its own
