"""Who holds which rows, and the agreement check every sharded object runs at construction.

Tokens are split into contiguous row shards, one per rank, in rank order; shards may
have different sizes (at least one row each). ``agree`` all-gathers one small int64
vector of per-rank facts (row count, feature dims, dtype, mode...) so that a rank whose
inputs disagree with the others makes *every* rank raise the same clear error, instead
of a ring step hanging on a buffer of the wrong size or silently mixing dtypes.
"""
from __future__ import annotations

import datetime
import os
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "agree", "init_distributed", "row_partition", "local_rows_of"]

# dtypes as small integers for the metadata vector (position in this tuple)
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else len(_DTYPE_CODES)


def float_bits(value: float) -> int:
    """The float64 bit pattern as an int, so float settings compare exactly across ranks."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def init_distributed(backend: str | None = None, *, timeout_s: float = 300.0, init_method: str | None = None,
                     rank: int | None = None, world_size: int | None = None) -> None:
    """Initialise the default process group with a collective timeout (torchrun-friendly).

    Args:
        backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo.
        timeout_s: seconds after which a collective or ring step that waits on a dead or
            stuck rank fails with an error instead of hanging.
        init_method, rank, world_size: as ``torch.distributed.init_process_group``; under
            ``torchrun`` leave them out (read from the environment).

    On CUDA the device is set from ``LOCAL_RANK`` first. Does nothing if the default group
    already exists.
    """
    if dist.is_initialized():
        return
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def row_partition(n: int, world_size: int) -> list[int]:
    """Row counts of an even split of n rows over world_size ranks (the first n % P get one more)."""
    if n < world_size:
        raise ValueError(f"cannot split {n} rows over {world_size} ranks (each rank needs at least one row)")
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def local_rows_of(t: torch.Tensor, counts, rank: int, dim: int = -2) -> torch.Tensor:
    """Rank ``rank``'s rows of a full tensor split by ``counts`` along ``dim`` (tests, loaders)."""
    start = sum(counts[:rank])
    return t.narrow(dim, start, counts[rank])


@dataclass(frozen=True)
class ShardLayout:
    """Row shards of an N-token problem: counts per rank, this rank, and how to reach peers."""
    group: object
    rank: int
    world_size: int
    counts: tuple

    @property
    def n_total(self) -> int:
        return sum(self.counts)

    def start(self, rank: int) -> int:
        return sum(self.counts[:rank])

    @property
    def local_rows(self) -> tuple[int, int]:
        """(start, stop) of this rank's rows in the global order."""
        s = self.start(self.rank)
        return s, s + self.counts[self.rank]

    @property
    def n_local(self) -> int:
        return self.counts[self.rank]

    def peer(self, group_rank: int) -> int:
        """Global rank of a rank of this group (what point-to-point calls take)."""
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call spectral_kernels.distributed.init_distributed() "
                           "(or torch.distributed.init_process_group) on every rank first, e.g. under torchrun")
    return dist.get_rank(group), dist.get_world_size(group)


def agree(what: str, n_local: int, fields: dict, *, device, group=None) -> ShardLayout:
    """All-gather (n_local, fields...) and raise ValueError on every rank if any field differs.

    Args:
        what: the object being built, for the message ("ShardedKQAffinity").
        n_local: this rank's row count (may differ between ranks; must be ≥ 1 everywhere).
        fields: name → int (or float, compared bit for bit) that must be equal on all ranks.
        device: where the metadata tensor lives (CUDA for NCCL groups).

    Returns the ShardLayout (row counts of all ranks).
    """
    rank, world = _group_info(group)
    names = list(fields)
    values = [int(n_local)] + [_encode(v) for v in fields.values()]
    local = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    try:
        dist.all_gather(gathered, local, group=group)
    except RuntimeError as err:
        raise RuntimeError(f"{what}: exchanging shapes with the other ranks failed on rank {rank} (a rank died, "
                           f"or the process group's timeout expired): {err}") from err
    table = torch.stack(gathered).cpu()
    problems = []
    for i, name in enumerate(names, start=1):
        column = table[:, i]
        if bool((column != column[0]).any()):
            per_rank = ", ".join(f"rank {r}: {_show(fields[name], int(column[r]))}" for r in range(world))
            problems.append(f"{name} ({per_rank})")
    counts = tuple(int(c) for c in table[:, 0])
    empty = [r for r, c in enumerate(counts) if c < 1]
    if empty:
        problems.append(f"ranks {empty} hold no rows (every rank needs at least one row)")
    if problems:
        raise ValueError(f"{what}: ranks disagree on " + "; ".join(problems))
    return ShardLayout(group=group, rank=rank, world_size=world, counts=counts)


def _encode(value) -> int:
    if isinstance(value, torch.dtype):
        return dtype_code(value)
    if isinstance(value, float):
        return float_bits(value)
    return int(value)


def _show(example, value):
    if isinstance(example, float):
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if isinstance(example, torch.dtype):
        return str(_DTYPE_CODES[value]) if value < len(_DTYPE_CODES) else "other dtype"
    return str(value)
