"""One prepared GPU check: the real-size model on one GPU in about five minutes, offline.

    bash scripts/gpu_check.sh                  # on a bare GPU machine: installs .whl/, runs the check
    python -m construct.tools.gpu_check              # the check alone (dependencies already installed)
    python -m construct.tools.gpu_check --dry-run    # tiny towers on the CPU: what the test suite runs

Parts, each with a time cap (a failed part is recorded and the next one runs):

1. environment: GPU, its memory, torch/CUDA/cuDNN/NCCL versions, CPU cores, package versions;
2. training throughput of every ``construct.tools.bench.VARIANTS`` entry with real-size random towers
   and bf16 autocast, at batch 10 and at the largest batch whose peak memory stays within
   ``--memory-gib`` (8 GiB);
3. ``main.py`` on generated synthetic tiles (``python -m construct.data.synthetic``) at real size:
   DataLoader workers with pinned memory, a validation pass and checkpoints;
4. evaluation throughput on generated test tiles with TTA, without and with the CRF pool on all
   cores, split into model, post-processing + CRF and loading time;
5. DDP under torchrun with one process (NCCL);
6. the projection to BCSS-WSSS: 2 training epochs (23,422 tiles, batch 10) and the 4,986-tile
   test split with TTA + CRF.

Writes ``gpu_check.json`` and ``gpu_check.md`` (a section for docs/benchmarks.md) to ``--out``
after every part; exits 1 when a part failed or was skipped, 2 when there is no CUDA device.
"""
