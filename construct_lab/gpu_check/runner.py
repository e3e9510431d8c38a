"""Command line and orchestration of the GPU check: parts in child processes, each under a time cap.

Every measuring part runs in its own process group, so a part past its cap is stopped with all
its workers (DataLoader, CRF pool, torchrun) and the check goes on with the next part. The report
is rewritten after every part; a child rewrites its partial result after every measurement.
"""

from __future__ import annotations

import argparse
import codecs
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from construct.cli import add_device_arguments, resolve_device, run_cli
from construct.errors import ConStructError
from construct_lab.gpu_check.plan import CONFIGS, REPO, Plan, check_config, nccl_version, usable_cpus, write_json
from construct_lab.gpu_check.report import projection, render_markdown


@dataclass(frozen=True)
class Limits:
    """Time cap of a part, and the least time worth starting it with."""

    cap_s: float
    min_s: float


# Seconds. Real run: at most 480 s on one H100/H200 (every measurement on the eager and the fast
# path), so install + check stay within 9 minutes.
PART_LIMITS: dict[bool, dict[str, Limits]] = {
    False: {"train_bench": Limits(130, 40), "train_match": Limits(40, 15), "train_run": Limits(75, 40),
            "train_run_fast": Limits(75, 40), "loader": Limits(20, 10), "eval": Limits(90, 40),
            "torchrun": Limits(40, 20)},
    True: {"train_bench": Limits(150, 20), "train_match": Limits(60, 10), "train_run": Limits(150, 20),
           "train_run_fast": Limits(150, 20), "loader": Limits(60, 10), "eval": Limits(120, 15),
           "torchrun": Limits(120, 15)},
}
DEFAULT_BUDGET_S = {False: 480.0, True: 540.0}  # a dry run must end within the tests' 600 s
SYNTHETIC_TILES = {False: {"train": 1000, "val": 40, "test": 128}, True: {"train": 16, "val": 4, "test": 4}}
TRAIN_RUN_MAX_ITERS = {False: {"eager": 200, "fast": 500}, True: {"eager": 2, "fast": 2}}
CHECKED_MODULES = ("transformers", "tokenizers", "timm", "open_clip", "ftfy", "conch", "pydensecrf")
PACKAGES = ("torchvision", "numpy", "transformers", "tokenizers", "huggingface_hub", "timm", "open_clip_torch",
            "conch-fork", "pydensecrf2")
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class PartError(Exception):
    """A part failed; ``result`` keeps whatever it measured before."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]", path.read_text(encoding="utf-8", errors="replace")) if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _pump(stream: IO[bytes], log: IO[str], prefix: str) -> None:
    """Copy a child's output to its log and, line by line, to the console (progress bars at most every 10 s)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    last_progress = 0.0
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        text = decoder.decode(chunk)
        log.write(text)
        log.flush()
        *segments, pending = re.split(r"(?<=[\r\n])", pending + text)
        for segment in segments:
            body = segment.rstrip("\r\n").strip()
            if not body:
                continue
            if segment.endswith("\n"):
                print(prefix + body, flush=True)
            elif time.monotonic() - last_progress >= 10:
                print(prefix + body, flush=True)
                last_progress = time.monotonic()
    if pending.strip():
        print(prefix + pending.strip(), flush=True)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (its workers included), SIGKILL to what is left 5 s later."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group is gone already
        return
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run ``command`` in the repository in its own process group, output to ``log_path`` and the
    console; past ``timeout`` seconds the whole group is stopped. Raises PartError on a timeout or a
    non-zero exit, naming the last line the command printed."""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        pump = threading.Thread(target=_pump, args=(process.stdout, log, "    | "), daemon=True)
        pump.start()
        try:
            code = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            _stop_group(process)
            pump.join(5)
            raise PartError(f"stopped at its time cap of {timeout:.0f} s; last output: {_last_line(log_path)}") from None
        except BaseException:
            _stop_group(process)
            raise
        _stop_group(process)  # leftovers of the group (a worker that outlived its parent)
        pump.join(10)
    if code != 0:
        raise PartError(f"exit status {code}: {_last_line(log_path)} (log: {log_path})")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def pin_mismatches(versions: dict[str, str | None]) -> dict[str, str]:
    """Installed versions that differ from requirements.txt (recorded, not fatal: a part that
    cannot work with them fails on its own)."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower().replace("_", "-")] = version
    return {name: f"{found} (requirements.txt: {pins[key]})" for name, found in versions.items()
            if (key := name.lower().replace("_", "-")) in pins and found is not None and found != pins[key]}


def _driver_version() -> str | None:
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return output.strip().splitlines()[0] if output.strip() else None


def describe_environment(device: torch.device) -> dict[str, Any]:
    """GPU, versions, CPU cores; fails (after recording all of it) when a dependency does not import."""
    from construct_lab.bench import machine_description

    env: dict[str, Any] = {
        "machine": machine_description(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(), "packages": package_versions(),
    }
    env["pin_mismatches"] = pin_mismatches(env["packages"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   nccl=nccl_version(), driver=_driver_version())
    missing = [name for name in CHECKED_MODULES if importlib.util.find_spec(name) is None]
    if "pydensecrf" not in missing:
        try:
            importlib.import_module("pydensecrf.densecrf")  # the one compiled package the check carries
        except ImportError as exc:
            missing.append(f"pydensecrf.densecrf ({exc})")
    if missing:
        raise PartError(f"missing {', '.join(missing)}: install the wheels first (scripts/gpu_check.sh)", env)
    return env


class Check:
    """One run of the check: the report, the time budget, and the parts in order."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.dry_run = args.dry_run
        self.device = device
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_root = self.out / "data"
        self.memory_limit_mib = args.memory_gib * 1024
        self.budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[self.dry_run]
        self.limits = PART_LIMITS[self.dry_run]
        self.started = time.monotonic()
        self.env = {**os.environ, **CHILD_ENV}
        self.data_process: subprocess.Popen | None = None
        self.data_started = 0.0
        self.report: dict[str, Any] = {
            "check": "construct_lab.gpu_check", "version": 1, "date": datetime.date.today().isoformat(),
            "command": "python -m construct_lab.gpu_check " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
            "dry_run": self.dry_run, "device": str(device), "budget_s": self.budget, "parts": {},
        }

    # -- bookkeeping -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        self.report["total_s"] = self.elapsed()
        write_json(self.out / "gpu_check.json", self.report)
        (self.out / "gpu_check.md").write_text(render_markdown(self.report) + "\n", encoding="utf-8")

    def record(self, name: str, action: Callable[[], dict[str, Any]], cap: float | None = None) -> None:
        """Run one part; its result or its failure goes into the report, and the check goes on."""
        print(f"\n== {name}" + (f" (time cap {cap:.0f} s)" if cap else "") + f" [{self.elapsed():.0f} s elapsed]", flush=True)
        started = time.monotonic()
        try:
            part = {"status": "ok", **action()}
        except PartError as exc:
            part = {"status": "failed", "error": str(exc), **exc.result}
        except Exception as exc:  # a bug or an environment problem in the parent: recorded, the check goes on
            (self.logs / f"{name}.traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
            part = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        part["seconds"] = time.monotonic() - started
        self.report["parts"][name] = part
        print(f"-> {name}: {part['status']}" + (f": {part['error']}" if part.get("error") else "")
              + f" ({part['seconds']:.0f} s)", flush=True)
        self.save()

    def skip(self, name: str, reason: str) -> None:
        print(f"\n== {name}: skipped ({reason})", flush=True)
        self.report["parts"][name] = {"status": "skipped", "error": reason, "seconds": 0.0}
        self.save()

    def limit_for(self, name: str, later: list[str]) -> float:
        """This part's cap, cut so the parts after it still get their minimum within the budget."""
        reserve = sum(self.limits[n].min_s for n in later)
        return min(self.limits[name].cap_s, self.budget - self.elapsed() - reserve)

    # -- children ------------------------------------------------------------------------------
    def plan(self, name: str, limit: float, **fields: Any) -> Plan:
        margin = 8.0 if not self.dry_run else 5.0  # the child stops measuring this long before its cap
        return Plan(device=str(self.device), dry_run=self.dry_run, deadline=time.time() + limit - margin,
                    result_path=str(self.logs / f"{name}.result.json"), data_root=str(self.data_root),
                    memory_limit_mib=self.memory_limit_mib, **fields)

    def run_child(self, name: str, plan: Plan, limit: float, launcher: list[str] | None = None) -> dict[str, Any]:
        plan_path = self.logs / f"{name}.plan.json"
        plan.write(plan_path)
        result_path = Path(plan.result_path)
        result_path.unlink(missing_ok=True)
        command = [*(launcher or [sys.executable, "-m"]), "construct_lab.gpu_check", "--child", name, "--plan", str(plan_path)]
        try:
            run_logged(command, self.logs / f"{name}.log", limit, self.env)
        except PartError as exc:
            raise PartError(str(exc), self._read_result(result_path)) from None
        result = self._read_result(result_path)
        if not result:
            raise PartError(f"the child wrote no result ({result_path})")
        return result

    @staticmethod
    def _read_result(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    # -- synthetic data ----------------------------------------------------------------------------
    def start_data(self) -> None:
        """Generate the synthetic tiles in the background while the GPU measures training steps."""
        tiles = SYNTHETIC_TILES[self.dry_run]
        size = check_config(self.dry_run).model.image_size
        command = [sys.executable, "-m", "construct_lab.synthetic.tiles", "--out", str(self.data_root), "--train",
                   str(tiles["train"]), "--val", str(tiles["val"]), "--test", str(tiles["test"]), "--seed", "0",
                   "--size", str(size)]
        log = open(self.logs / "data.log", "w", encoding="utf-8")  # noqa: SIM115 - the child owns it until it exits
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        self.data_started = time.monotonic()
        self.data_process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        log.close()

    def wait_data(self, timeout: float) -> None:
        """Block until the tiles exist (recording the data part once); PartError if they never will."""
        if "data" not in self.report["parts"]:
            def finish() -> dict[str, Any]:
                assert self.data_process is not None
                try:
                    code = self.data_process.wait(timeout=max(timeout, 1.0))
                except subprocess.TimeoutExpired:
                    _stop_group(self.data_process)
                    raise PartError(f"still generating after waiting {timeout:.0f} s") from None
                if code != 0:
                    raise PartError(f"exit status {code}: {_last_line(self.logs / 'data.log')}")
                return {"generation_s": time.monotonic() - self.data_started, "root": str(self.data_root),
                        "tiles": SYNTHETIC_TILES[self.dry_run]}

            self.record("data", finish)
        if self.report["parts"]["data"]["status"] != "ok":
            raise PartError("no synthetic data (see the data part)")

    # -- parts -------------------------------------------------------------------------------------
    def train_bench(self, limit: float) -> dict[str, Any]:
        plan = self.plan("train_bench", limit, batch=2 if self.dry_run else 10, max_batch=4 if self.dry_run else 256)
        return self.run_child("train_bench", plan, limit)

    def train_run(self, limit: float, fast: bool = False) -> dict[str, Any]:
        """main.py on the synthetic tiles, on the eager path or with ``train.fast_path=true``."""
        name = "train_run_fast" if fast else "train_run"
        ends = time.monotonic() + limit
        self.wait_data(limit - self.limits[name].min_s)
        limit = ends - time.monotonic()
        iterations = self._train_run_iterations(limit, fast)
        work_dir = self.out / name
        config_path, base = CONFIGS[self.dry_run]
        workers = self.loader_workers()
        log_interval = max(1, iterations // 10)
        command = [sys.executable, "main.py", "--config", config_path, "--device", str(self.device), "--overwrite",
                   "--opts", *base, f"data.root={self.data_root}", f"work_dir={work_dir}", "train.epochs=1000",
                   f"train.max_iters={iterations}", f"train.eval_interval={iterations}",
                   f"train.checkpoint_interval={max(1, iterations // 2)}", f"train.log_interval={log_interval}",
                   f"data.num_workers={workers}", f"train.fast_path={'true' if fast else 'false'}"]
        run_logged(command, self.logs / f"{name}.log", limit, self.env)
        return {"fast_path": fast, **self._summarise_run(work_dir, iterations, workers)}

    def loader_workers(self) -> int:
        return 1 if self.dry_run else min(8, usable_cpus())

    def _train_run_iterations(self, limit: float, fast: bool) -> int:
        """As many iterations (up to 200 eager, 500 fast) as fit in the cap at the default
        objective's measured step time on that path."""
        most = TRAIN_RUN_MAX_ITERS[self.dry_run]["fast" if fast else "eager"]
        if self.dry_run:
            return most
        bench = self.report["parts"].get("train_bench", {})
        key = "at_batch_fast" if fast else "at_batch"
        steps = [v[key]["seconds_per_step"] for v in bench.get("variants", {}).values()
                 if key in v and v.get("overrides") == []]
        if not steps:
            return most // 2
        start_up = 20 + bench.get("model_build_s", 10)  # imports, towers, loader workers, validation, checkpoints
        return max(20, min(most, int((limit - start_up) / (1.3 * steps[0]))))

    def _summarise_run(self, work_dir: Path, iterations: int, workers: int) -> dict[str, Any]:
        records = [json.loads(line) for line in (work_dir / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val"]
        result: dict[str, Any] = {
            "iterations": iterations, "batch": check_config(self.dry_run).train.batch_size, "num_workers": workers,
            "pin_memory": self.device.type == "cuda", "train_tiles": SYNTHETIC_TILES[self.dry_run]["train"],
            "val_tiles": SYNTHETIC_TILES[self.dry_run]["val"], "work_dir": str(work_dir),
            "checkpoints": sorted(p.name for p in work_dir.glob("*.pth")),
            "checkpoint_mb": {p.name: p.stat().st_size / 1e6 for p in sorted(work_dir.glob("*.pth"))},
            "final_losses": {k: v for k, v in train[-1].items() if k not in ("kind", "iteration", "epoch", "elapsed_s")}
            if train else {},
        }
        if len(train) >= 2:  # from the first log line on: start-up and validation left out
            result["steady_seconds_per_iteration"] = ((train[-1]["elapsed_s"] - train[0]["elapsed_s"])
                                                      / (train[-1]["iteration"] - train[0]["iteration"]))
        if val:
            result["val_miou"] = val[-1]["miou"]
        problems = [f"{name} missing" for name in ("latest.pth", "best.pth") if name not in result["checkpoints"]]
        if not val:
            problems.append("no validation record in log.jsonl")
        if problems:
            raise PartError("; ".join(problems), result)
        return result

    def evaluation(self, limit: float) -> dict[str, Any]:
        ends = time.monotonic() + limit
        self.wait_data(limit - self.limits["eval"].min_s)
        limit = ends - time.monotonic()
        plan = self.plan("eval", limit, loader_workers=self.loader_workers(),
                         crf_workers=2 if self.dry_run else usable_cpus(), eval_images=4 if self.dry_run else 256)
        return self.run_child("eval", plan, limit)

    def train_match(self, limit: float) -> dict[str, Any]:
        plan = self.plan("train_match", limit, batch=2 if self.dry_run else 10)
        return self.run_child("train_match", plan, limit)

    def loader(self, limit: float) -> dict[str, Any]:
        ends = time.monotonic() + limit
        self.wait_data(limit - self.limits["loader"].min_s)
        limit = ends - time.monotonic()
        plan = self.plan("loader", limit, loader_workers=self.loader_workers())
        return self.run_child("loader", plan, limit)

    def torchrun(self, limit: float) -> dict[str, Any]:
        plan = self.plan("torchrun", limit, batch=2 if self.dry_run else 10)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m"]
        return self.run_child("torchrun", plan, limit, launcher)

    def run(self) -> int:
        print(f"GPU check{' (dry run, CPU, tiny towers)' if self.dry_run else ''} on {self.device}: budget "
              f"{self.budget:.0f} s, output {self.out}", flush=True)
        self.record("environment", lambda: describe_environment(self.device))
        self.start_data()
        order = ["train_bench", "train_match", "train_run", "train_run_fast", "loader", "eval", "torchrun"]
        actions = {"train_bench": self.train_bench, "train_match": self.train_match, "train_run": self.train_run,
                   "train_run_fast": lambda limit: self.train_run(limit, fast=True), "loader": self.loader,
                   "eval": self.evaluation, "torchrun": self.torchrun}
        try:
            for index, name in enumerate(order):
                limit = self.limit_for(name, order[index + 1:])
                if limit < self.limits[name].min_s:
                    self.skip(name, f"only {max(limit, 0):.0f} s of the {self.budget:.0f} s budget left")
                    continue
                self.record(name, lambda action=actions[name], limit=limit: action(limit), cap=limit)
            self.record("projection", lambda: projection(self.report["parts"]))
        finally:
            if self.data_process is not None and self.data_process.poll() is None:
                _stop_group(self.data_process)
        failed = [name for name, part in self.report["parts"].items() if part["status"] != "ok"]
        self.report["ok"] = not failed
        self.save()
        print("\n" + render_markdown(self.report), flush=True)
        print(f"wrote {self.out / 'gpu_check.json'} and {self.out / 'gpu_check.md'} in {self.elapsed():.0f} s"
              + (f"; not ok: {', '.join(failed)}" if failed else "; every part ok"), flush=True)
        return 1 if failed else 0


def _run_child(name: str, plan_path: str) -> None:
    from construct_lab.gpu_check.evaluation import run_evaluation
    from construct_lab.gpu_check.training import run_ddp, run_loader, run_match, run_training_bench

    children = {"train_bench": run_training_bench, "train_match": run_match, "loader": run_loader,
                "eval": run_evaluation, "torchrun": run_ddp}
    sys.exit(0 if children[name](Plan.read(plan_path)) else 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m construct_lab.gpu_check",
        description=(sys.modules["construct_lab.gpu_check"].__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="work_dirs/gpu_check",
                        help="folder for gpu_check.json, gpu_check.md, logs/, the synthetic data and the training run "
                        "(default: work_dirs/gpu_check)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with the demo's tiny towers and a few steps (what the tests run)")
    parser.add_argument("--budget", type=float, metavar="S",
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S[False]:.0f}; "
                        f"{DEFAULT_BUDGET_S[True]:.0f} with --dry-run); parts are cut to fit")
    parser.add_argument("--memory-gib", type=float, default=8.0,
                        help="memory limit of the largest-batch search, in GiB of CUDA max allocated (default 8)")
    add_device_arguments(parser)
    parser.add_argument("--child", choices=("train_bench", "train_match", "loader", "eval", "torchrun"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    return parser


def _main(args: argparse.Namespace) -> None:
    if args.child:
        _run_child(args.child, args.plan)
    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available() and args.gpu is None and not args.device:
            raise ConStructError("no CUDA device on this machine: the GPU check needs one (--dry-run runs it on the CPU)")
        device = resolve_device(args)
        if device.type != "cuda":
            raise ConStructError(f"--device {device}: the GPU check needs a CUDA device (--dry-run runs it on the CPU)")
    if args.memory_gib <= 0 or (args.budget is not None and args.budget <= 0):
        raise ConStructError("--memory-gib and --budget must be positive")
    sys.exit(Check(args, device).run())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.set_defaults(argv=argv)
    run_cli(_main, parser, argv)
