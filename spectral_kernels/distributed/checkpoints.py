"""Per-rank checkpoints in two alternating slots, and the agreement on which one to resume.

Each rank writes ``PREFIX.rank{r}-of-{P}.slot{0,1}.pt`` atomically (``checkpoint.save_atomic``:
temporary file + rename). Slots alternate, so a rank that dies while writing keeps its
previous slot; on resume the ranks all-gather the iterations they hold and load the newest
one that *every* rank has — a consistent state even when the ranks stopped at different
points.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .shards import ShardLayout

__all__ = ["slot_paths", "save_slot", "load_common"]


def slot_paths(prefix, layout: ShardLayout) -> list[str]:
    prefix = os.fspath(prefix)
    return [f"{prefix}.rank{layout.rank}-of-{layout.world_size}.slot{s}.pt" for s in (0, 1)]


def save_slot(prefix, layout: ShardLayout, iteration: int, every: int, state: dict) -> None:
    """Write ``state`` (plus iteration and layout) to slot (iteration // every) % 2 of this rank."""
    state = dict(state, iteration=int(iteration), world_size=layout.world_size, rank=layout.rank,
                 counts=list(layout.counts))
    ckpt.save_atomic(state, slot_paths(prefix, layout)[(iteration // every) % 2])


def load_common(prefix, layout: ShardLayout, device, expected: dict) -> dict | None:
    """The newest state saved by every rank (None if no rank has any); checks ``expected`` keys.

    Collective. Raises RuntimeError if the ranks' checkpoints share no iteration, and
    ValueError if the saved run had another layout or settings.
    """
    states = {}
    for path in slot_paths(prefix, layout):
        if os.path.exists(path):
            state = ckpt.load(path, device=device)
            states[int(state["iteration"])] = state
    mine = torch.full((2,), -1, dtype=torch.int64, device=device)
    for i, it in enumerate(sorted(states)[-2:]):
        mine[i] = it
    gathered = [torch.empty_like(mine) for _ in range(layout.world_size)]
    dist.all_gather(gathered, mine, group=layout.group)
    sets = [set(int(v) for v in g.tolist() if v >= 0) for g in gathered]
    if not any(sets):
        return None
    common = set.intersection(*sets)
    if not common:
        listing = ", ".join(f"rank {r}: {sorted(s)}" for r, s in enumerate(sets))
        raise RuntimeError(f"checkpoint {os.fspath(prefix)!r}: the ranks have no saved iteration in common ({listing})")
    state = states[max(common)]
    expected = dict(expected, world_size=layout.world_size, counts=list(layout.counts))
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"checkpoint {os.fspath(prefix)!r} was written with {key} = {state.get(key)!r}, "
                             f"this run has {value!r}; resume with the same setup")
    return state
