"""Speed and memory of the real-size architectures (random weights), written to docs/benchmarks.md.

    python -m construct_lab.bench --device cpu          # or --device cuda:0 (bf16 autocast)

Measures (a) training throughput and peak memory at batch 10 for cls, cls+struct and
the full loss with each L_sim setting (default and the paper's), and the full loss with the QuiltNet
student instead of CONCH; (b) inference throughput with and without TTA and CRF, and the CRF with one
worker against all cores; (c) the size of a training checkpoint. Each measurement runs in its own
process so peak-memory figures do not mix. Nothing here is a test: the numbers depend on the
machine, which the report names.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from construct.config import PAPER_SIM_OVERRIDES
from construct_lab.paths import REPO

if TYPE_CHECKING:
    from construct.config import Config

REPORT = REPO / "docs" / "benchmarks.md"
PAPER_SIM = list(PAPER_SIM_OVERRIDES)
QUILTNET = ["model.student.name=quiltnet", "model.student.checkpoint=null"]
VARIANTS = {
    "cls": ["loss.struct_weight=0", "loss.sim_weight=0"],
    "cls+struct": ["loss.sim_weight=0"],
    "full": [],
    "full-paper": PAPER_SIM,
    "full-image112": [*PAPER_SIM, "loss.sim_view_size=112"],
    "full-image-8pairs": [*PAPER_SIM, "loss.sim_max_pairs=8"],
    "full-image-protograd": [*PAPER_SIM, "loss.sim_gradient=prototypes"],
    "full-image-checkpointed": [*PAPER_SIM, "loss.sim_checkpoint_chunk=10"],
    "full-quiltnet": QUILTNET,
}
"""Training variants (config overrides). 'full' is the configs' default L_sim (token views); the
student is CONCH unless the variant names another."""
DESCRIPTIONS = {
    "cls": "cls",
    "cls+struct": "cls + struct",
    "full": "full, **default L_sim** (token views)",
    "full-paper": "full, **paper L_sim** (image views, all pairs, 224 px, grad through CONCH)",
    "full-image112": "full, image views at 112 px",
    "full-image-8pairs": "full, image views, ≤ 8 pairs per step",
    "full-image-protograd": "full, image views, gradient into prototypes only",
    "full-image-checkpointed": "full, image views, activation checkpointing (chunks of 10)",
    "full-quiltnet": "full, default L_sim, **QuiltNet-B-16 student** (OpenCLIP ViT-B/16) instead of CONCH",
}


def real_size_config(*overrides: str):
    from construct.config import load_config

    return load_config(REPO / "configs" / "bcss.yaml", ["model.conch.checkpoint=null", "model.teacher.checkpoint=null",
                                                        "train.batch_size=10", *overrides])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_objective(config: Config, model: torch.nn.Module, teacher: torch.nn.Module | None,
                       device: torch.device, fast: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The objective of ``config`` around ``model`` (teacher: None without L_struct) and AdamW on its trainable part.

    ``fast`` (CUDA only, as the trainer's ``train.fast_path``): the frozen towers replay CUDA graphs
    with bf16 weights and AdamW is fused. It changes ``model.student`` and ``teacher`` for good.
    """
    from construct.engine.objective import ConStructObjective
    from construct.models.graphs import enable_fast_path

    objective = ConStructObjective(model, teacher, config).to(device).train()
    if fast:
        for tower in (model.student, teacher):
            if tower is not None:
                enable_fast_path(tower)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr,
                                  **({"fused": True} if fast else {}))
    return objective, optimizer


def training_batch(batch_size: int, device: torch.device, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the model's size and multi-hot labels over the config's classes (about half present)."""
    size = config.model.image_size
    images = torch.rand(batch_size, 3, size, size, device=device)
    labels = (torch.rand(batch_size, len(config.data.classes), device=device) < 0.5).float()
    labels[labels.sum(1) == 0, 0] = 1.0
    return images, labels


def training_step(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor, use_bf16: bool) -> dict[str, torch.Tensor]:
    """One optimisation step as the trainer takes it (bf16 autocast on CUDA when asked); returns the losses."""
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        losses = objective(images, labels)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return losses


def bench_training(variant: str, device: torch.device, steps: int) -> dict[str, Any]:
    from construct.checkpoint import save_checkpoint
    from construct.models.build import build_model, build_teacher

    config = real_size_config(*VARIANTS[variant])
    torch.manual_seed(0)
    model = build_model(config, device)
    teacher = build_teacher(config, device) if config.loss.struct_weight > 0 else None
    objective, optimizer = training_objective(config, model, teacher, device)
    images, labels = training_batch(10, device, config)
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        training_step(objective, optimizer, images, labels, use_bf16)

    step()  # warm-up: allocator, kernels, memory bank
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    result = {"variant": variant, "seconds_per_step": seconds, "images_per_s": 10 / seconds,
              "peak_memory_mib": peak_memory_mib(device), "pairs_per_step": int(labels.sum())}
    if variant == "full":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "latest.pth"
            save_checkpoint({"model": model.trainable_state_dict(), "objective": objective.extra_state_dict(),
                             "optimizer": optimizer.state_dict()}, path)
            result["checkpoint_mb"] = path.stat().st_size / 1e6
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in teacher.parameters())
        result["trainable_params"] = trainable
        result["total_params"] = total
    return result


def bench_inference(device: torch.device, images_count: int) -> dict[str, Any]:
    import numpy as np

    from construct.inference.predictor import Predictor
    from construct.models.build import build_model
    from construct_lab.synthetic.tiles import make_tile

    configs = {mode: real_size_config(f"inference.tta={mode}") for mode in ("intensity", "resize")}
    torch.manual_seed(0)
    model = build_model(configs["intensity"], device).eval()
    rng = np.random.default_rng(0)
    tiles = np.stack([make_tile(rng, 224)[0] for _ in range(images_count)])
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    cpu_count = os.cpu_count() or 1
    settings = {  # name: (inference.tta, Predictor options)
        "no TTA, no CRF": ("intensity", {"tta": False, "crf": False, "workers": 1}),
        "TTA intensity (6 passes), no CRF": ("intensity", {"tta": True, "crf": False, "workers": 1}),
        "TTA resize (6 passes), no CRF": ("resize", {"tta": True, "crf": False, "workers": 1}),
        "no TTA, CRF 1 worker": ("intensity", {"tta": False, "crf": True, "workers": 1}),
        f"no TTA, CRF {cpu_count} workers": ("intensity", {"tta": False, "crf": True, "workers": cpu_count}),
        f"TTA intensity + CRF {cpu_count} workers": ("intensity", {"tta": True, "crf": True, "workers": cpu_count}),
    }
    results = {}
    batch = configs["intensity"].inference.batch_size
    for name, (mode, kwargs) in settings.items():
        with Predictor(model, configs[mode], device, **kwargs) as predictor:
            predictor.predict_batch(images[:2])  # warm-up (and CRF worker start-up)
            synchronize(device)
            started = time.perf_counter()
            for start in range(0, images_count, batch):
                predictor.predict_batch(images[start:start + batch])
            synchronize(device)
            results[name] = images_count / (time.perf_counter() - started)
    return {"images": images_count, "images_per_s": results}


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host: {text}"
    return text


def run_child(args: list[str]) -> dict[str, Any]:
    output = subprocess.run([sys.executable, "-m", "construct_lab.bench", *args], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def render_section(device: torch.device, training: list[dict[str, Any]], inference: dict[str, Any]) -> str:
    kind = "CUDA" if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    memory = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the process"
    today = datetime.date.today().isoformat()
    by_name = {r["variant"]: r for r in training}
    full = by_name["full"]
    lines = [
        f"## {kind} ({precision})",
        "",
        f"Measured {today} on: {machine_description(device)}. Real-size architectures (CONCH ViT-B/16 + MiT-B1)",
        "with random weights, 224 px, batch 10; `python -m construct_lab.bench --device "
        f"{'cuda:0' if device.type == 'cuda' else 'cpu'}`.",
        "",
        f"| training losses | s / step | images / s | peak memory ({memory}) |",
        "|---|---|---|---|",
        *[f"| {DESCRIPTIONS[r['variant']]} | {r['seconds_per_step']:.2f} | {r['images_per_s']:.2f} | "
          f"{r['peak_memory_mib'] / 1024:.2f} GiB |" for r in training],
        "",
        f"L_sim embeds an FG and a BG view for each (image, present class) pair: {full['pairs_per_step']} pairs in the",
        f"benchmark batch. Image views cost {2 * full['pairs_per_step']} extra CONCH image-encoder passes (forward and",
        "backward) per step; token views pool the tokens the forward pass already computed.",
        *([f"Default full step / cls+struct step: **{full['seconds_per_step'] / by_name['cls+struct']['seconds_per_step']:.2f}×**."]
          if "cls+struct" in by_name else []),
        "",
        f"| inference ({inference['images']} synthetic tiles) | images / s |",
        "|---|---|",
        *[f"| {name} | {value:.2f} |" for name, value in inference["images_per_s"].items()],
        "",
        f"Checkpoint (`latest.pth`: trainable state + AdamW state + memory bank): **{full['checkpoint_mb']:.1f} MB**.",
        f"Trainable parameters: {full['trainable_params']:,} of {full['total_params']:,} "
        f"({100 * full['trainable_params'] / full['total_params']:.2f}%).",
        "",
    ]
    return "\n".join(lines)


def update_report(section: str, heading: str) -> None:
    """Replace this device kind's section of docs/benchmarks.md (other sections stay)."""
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {heading} .*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    REPORT.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--images", type=int, default=None, help="inference tiles (default: 16 on CPU, 256 on CUDA)")
    parser.add_argument("--no-write", action="store_true", help="print the report section instead of updating docs/benchmarks.md")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated training variants (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--child", choices=("train", "infer"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    steps = args.steps or (10 if on_cuda else 2)
    images = args.images or (256 if on_cuda else 16)
    if args.child == "train":
        print(json.dumps(bench_training(args.variant, device, steps)))
        return
    if args.child == "infer":
        print(json.dumps(bench_inference(device, images)))
        return
    common = ["--device", args.device, "--steps", str(steps), "--images", str(images)]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or "full" not in chosen:
        parser.error(f"--variants: unknown {unknown} or 'full' missing (choose from {', '.join(VARIANTS)})")
    training = []
    for variant in chosen:
        print(f"training: {variant} ...", flush=True)
        training.append(run_child(["--child", "train", "--variant", variant, *common]))
        print(f"  {training[-1]}", flush=True)
    print("inference ...", flush=True)
    inference = run_child(["--child", "infer", *common])
    print(f"  {inference}", flush=True)
    section = render_section(device, training, inference)
    if args.no_write:
        print(section)
    else:
        update_report(section, "CUDA" if on_cuda else "CPU")
        print(f"updated {REPORT}")


if __name__ == "__main__":
    main()
