"""The CUDA fast path of the frozen towers: bf16 weights and forwards replayed as CUDA graphs.

At batch 10 a ConStruct step waits on kernel launches, not arithmetic (issue #23): the frozen
CONCH and MiT forwards are hundreds of small kernels, each launched from Python. Their shapes are
static (the training batch, each TTA pass), they take no gradient and draw no random numbers, so
each input shape is captured once as a CUDA graph and replayed with one call afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

WARMUP_PASSES = 2
"""Eager passes on a side stream before a capture (cuBLAS/cuDNN handles and workspaces, lazy init)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    static_output: Any


class FrozenGraphs:
    """CUDA graphs of one frozen module's no-grad forward, one per (key, input shape, dtype, device).

    The forward runs under bf16 autocast (its weight cache off, as graph capture requires). A
    replay copies the input into the graph's static input and returns clones of its static
    outputs, so a later replay never overwrites what a caller still holds. Graphs are dropped
    when the module's weights moved (``.to()`` gives them new storage that old graphs do not read).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.graphs: dict[Hashable, _Captured] = {}
        self.weights_at = self._weights_address()

    def _weights_address(self) -> int:
        return next(self.module.parameters()).data_ptr()

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, key: Hashable, forward: Callable[[Tensor], Any], images: Tensor) -> Any:
        """``forward(images)``, replayed from the graph of (``key``, the shape of ``images``)."""
        if self._weights_address() != self.weights_at:
            self.graphs.clear()
            self.weights_at = self._weights_address()
        signature = (key, tuple(images.shape), images.dtype, images.device)
        captured = self.graphs.get(signature)
        if captured is None:
            captured = self.graphs[signature] = _capture(forward, images)
        captured.static_input.copy_(images)
        captured.graph.replay()
        return _clone(captured.static_output)


def _clone(value: Any) -> Any:
    """Tensors cloned out of nested lists and tuples (what the towers return); anything else as is."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(item) for item in value)
    return value


def _bf16_autocast() -> torch.autocast:
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)


def _capture(forward: Callable[[Tensor], Any], images: Tensor) -> _Captured:
    static_input = images.clone()
    current = torch.cuda.current_stream(images.device)
    side = torch.cuda.Stream(device=images.device)
    side.wait_stream(current)
    with torch.cuda.stream(side), torch.no_grad(), _bf16_autocast():
        for _ in range(WARMUP_PASSES):
            forward(static_input)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: DataLoader pin-memory threads and CRF pools may call CUDA while this thread captures.
    with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"), _bf16_autocast():
        static_output = forward(static_input)
    return _Captured(graph, static_input, static_output)


def enable_fast_path(tower: nn.Module) -> None:
    """Store a frozen tower's linear and convolution weights in bf16 and replay its forward as CUDA graphs.

    ``tower`` is a student (:class:`~construct.models.student.Student`) or a
    :class:`~construct.models.segformer.MiTTeacher` on a CUDA device. Under bf16 autocast these are
    the weights autocast would cast on every call (same rounding), so only the launches go; norms
    and embeddings stay fp32. Calling it again changes nothing.
    """
    parameter = next(tower.parameters())
    if parameter.device.type != "cuda":
        raise ValueError(f"the fast path needs the tower on a CUDA device, not {parameter.device}")
    if not hasattr(tower, "graphs"):
        raise TypeError(f"{type(tower).__name__} has no graph hook (the students and MiTTeacher have)")
    for module in tower.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
    if tower.graphs is None:
        tower.graphs = FrozenGraphs(tower)
