"""One prepared GPU check: the real-size model on one GPU in about eight minutes, offline.

    bash scripts/gpu_check.sh                  # on a bare GPU machine: installs .whl/, runs the check
    python -m construct_lab.gpu_check              # the check alone (dependencies already installed)
    python -m construct_lab.gpu_check --dry-run    # tiny towers on the CPU: what the test suite runs

Parts, each with a time cap (a failed part is recorded and the next one runs):

1. environment: GPU, its memory, torch/CUDA/cuDNN/NCCL versions, CPU cores, package versions;
2. training throughput of every ``construct_lab.bench.VARIANTS`` entry with real-size random towers
   and bf16 autocast, at batch 10 on the eager and the fast path (``train.fast_path``: CUDA graphs
   of the frozen towers, bf16 weights, fused AdamW, no per-step sync), and at the largest batch
   whose peak memory stays within ``--memory-gib`` (8 GiB);
3. the default objective on both paths from the same weights over the same 50 batches: the
   losses side by side and whether they match (``training.MATCH_TOLERANCE``);
4. ``main.py`` on generated synthetic tiles (``python -m construct_lab.synthetic.tiles``) at real size,
   eager and with ``train.fast_path=true``: DataLoader workers with pinned memory, a validation
   pass and checkpoints;
5. the training loader alone (PNG decoding and augmentation), to set beside the step rate;
6. evaluation throughput on generated test tiles with TTA, without and with the CRF pool on all
   cores, eager and with ``inference.fast_path``, split into model, post-processing + CRF and
   loading time;
7. DDP under torchrun with one process (NCCL);
8. the projection to BCSS-WSSS, each path on its own row: 2 training epochs (23,422 tiles,
   batch 10) and the 4,986-tile test split with TTA + CRF in one protocol and in both.

Writes ``gpu_check.json`` and ``gpu_check.md`` (a section for docs/benchmarks.md) to ``--out``
after every part; exits 1 when a part failed or was skipped, 2 when there is no CUDA device.
"""
