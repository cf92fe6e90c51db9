"""One optimiser step captured as a CUDA graph and replayed: no Python, no launch overhead.

A solver step at single-image sizes is launch-bound, not N²-bound: a few dozen small
kernels (pooling, normalisation, the fused product, the einsums of the loss, their
backward, Adam) and the Python that launches them cost more than the arithmetic. Captured
once, a step replays as one graph launch.

The pattern is PyTorch's whole-network capture: the first ``warmup`` steps run eagerly on
a side stream (Triton autotuning, the cuda backend's timing, lazy initialisation and the
allocator's first allocations must all happen before capture, none of them can happen
during it); the next step is captured with the gradients set to None, so that backward
allocates them from the graph's private pool, and is then replayed — it and every later
step write the same output, gradient and optimizer-state memory. The step function must
therefore take no input that changes between steps (fixed affinities, fixed image index)
and the optimizer must be built with ``capturable=True``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["GraphedStep"]


class GraphedStep:
    """``step()`` runs ``step_fn`` — forward, backward and optimizer update, returning the
    loss — eagerly ``warmup`` times, then captures it and replays the graph.

    The returned loss tensor is the graph's static output from the capture on: it is
    overwritten by the next step, so callers keep ``loss.detach().clone()``.
    """

    def __init__(self, step_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, *, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (autotuning cannot run during capture), got {warmup}")
        self._step_fn = step_fn
        self._optimizer = optimizer
        self._warmup_left = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_loss: Tensor | None = None
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self) -> Tensor:
        if self._graph is not None:
            self._graph.replay()
            return self._static_loss
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return self._eager_on_side_stream()
        return self._capture_and_run()

    def _eager_on_side_stream(self) -> Tensor:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            self._optimizer.zero_grad(set_to_none=True)
            loss = self._step_fn()
        current.wait_stream(self._side_stream)
        return loss

    def _capture_and_run(self) -> Tensor:
        # None gradients: backward inside the capture allocates them from the graph's pool,
        # and every replay rewrites that memory (no zero_grad between replays).
        self._optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_loss = self._step_fn()
        self._graph = graph
        graph.replay()  # capture records the step; this runs it
        return self._static_loss
