"""What a GPU-check child process is asked to measure, where it reports, and the config it runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from construct.atomic import write_text_atomic
from construct.config import Config, load_config
from construct_lab.paths import REPO

# The config file main.py and the children run, and the overrides that make it run offline:
# real-size random towers (the GPU check) or the demo's tiny towers (either student) on 64-px tiles (the CPU dry run).
CONFIGS: dict[bool, tuple[str, list[str]]] = {
    False: ("configs/bcss.yaml", ["model.conch.checkpoint=null", "model.teacher.checkpoint=null"]),
    True: ("configs/demo_random.yaml", ["testbed.dataset=null", "model.image_size=64", "model.student.preset=tiny"]),
}


def check_config(dry_run: bool, *overrides: str) -> Config:
    """The config of the check (see CONFIGS) with ``overrides`` (e.g. a bench variant's) applied."""
    path, base = CONFIGS[dry_run]
    return load_config(REPO / path, [*base, *overrides])


@dataclass
class Plan:
    """Handed to a child as JSON; the child rewrites ``result_path`` after every measurement, so
    whatever it measured survives a timeout."""

    device: str
    dry_run: bool
    deadline: float
    """time.time() by which the child should stop starting new measurements."""
    result_path: str
    data_root: str = ""
    batch: int = 10
    """Training batch of the throughput and DDP measurements (the paper's 10)."""
    max_batch: int = 256
    """Upper end of the largest-batch search."""
    memory_limit_mib: float = 8192.0
    loader_workers: int = 0
    crf_workers: int = 1
    eval_images: int = 256
    """Images each evaluation setting processes (passes over the test tiles repeat)."""

    def time_left(self) -> float:
        return self.deadline - time.time()

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def save_result(self, result: dict[str, Any]) -> None:
        write_json(Path(self.result_path), result)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader (or a killed writer) never leaves half a file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reserved_memory_mib(device: torch.device) -> float | None:
    """Peak memory the CUDA caching allocator held (what another process could not use)."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (in a
    container, os.cpu_count() often counts every CPU of the host)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            quota, period = (fields[0], fields[1]) if period_file is None else (fields[0], Path(period_file).read_text())
            if quota not in ("max", "-1"):
                count = min(count, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return count


def nccl_version() -> str | None:
    """NCCL's version as torch reports it (a tuple in recent releases, an int in old ones)."""
    if not torch.cuda.is_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
