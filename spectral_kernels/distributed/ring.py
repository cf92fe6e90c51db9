"""The ring pass: every rank sees every shard once, holding at most two shards at a time.

Shards travel rank r → r+1. At step t rank r holds the shard of rank (r − t) mod P; step 0
is its own. While step t's shard is being used, the next one is already in flight (one
``batch_isend_irecv`` posted before the compute, waited after it), as in ring attention:
a step costs max(compute, transfer), not their sum.

A pass can also *carry* an accumulator per shard (``carry=True``): the visitor returns a
contribution to the visiting shard's own rows (the transposed half of a symmetric product,
Eᵀ·X restricted to the visiting shard), and the accumulator travels with the shard, one
step behind it, summing the contributions of every rank it visits; after the last step it
makes one more hop and arrives home (with a half ring, ``steps < P``, it is sent straight
home from the last rank that held it). Carry messages ride in the same batched calls as the
next shard (same order on both ends of every link), so NCCL sees matched, grouped
send/recv pairs even with two ranks, where "next" and "previous" are the same peer.

Communication errors (a dead rank, the group's timeout) surface as RuntimeError naming the
ring step and the peers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .shards import ShardLayout

__all__ = ["ring_pass"]

_CARRY_TAG = 97


def _buffers_for(packet: Sequence[Tensor], token_dims: Sequence[int], rows: int) -> list[Tensor]:
    bufs = []
    for t, dim in zip(packet, token_dims):
        shape = list(t.shape)
        shape[dim] = rows
        bufs.append(torch.empty(shape, dtype=t.dtype, device=t.device))
    return bufs


def _carry_shape(like: Tensor, rows: int):
    return (rows, *like.shape[1:])


def _start(ops):
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works, layout: ShardLayout, step: int):
    try:
        for w in works:
            w.wait()
    except RuntimeError as err:
        prev = (layout.rank - 1) % layout.world_size
        nxt = (layout.rank + 1) % layout.world_size
        raise RuntimeError(f"ring step {step} on rank {layout.rank} failed while exchanging shards with ranks "
                           f"{prev} and {nxt} (a rank died, or the process group's timeout expired): {err}") from err


def ring_pass(layout: ShardLayout, packet: Sequence[Tensor], token_dims: Sequence[int],
              visit: Callable[[int, list[Tensor]], Tensor | None], *, carry: bool = False,
              carry_like: Tensor | None = None, steps: int | None = None) -> Tensor | None:
    """Call ``visit(source_rank, shard_tensors)`` for the shards of ranks rank, rank−1, ...

    Args:
        layout: the row shards (counts per rank) and process group.
        packet: this rank's tensors to circulate (e.g. k, x, offsets); each has its token
            dimension at ``token_dims[i]`` and may have a different size on every rank.
        visit: called for source ranks rank, rank−1, ... (mod P) with that rank's tensors.
            With ``carry=True`` it returns, for every source other than this rank, the
            contribution (rows of the source, ...) to add to the source's carried accumulator.
        carry: circulate accumulators back to their owners (see module docstring).
        carry_like: a tensor whose trailing shape and dtype the carried accumulators share
            (rows replaced by each shard's row count). Needed with ``carry=True``.
        steps: how many shards to visit (default all P). With fewer (a half ring, when each
            pair of shards needs computing once), the carried accumulators go home directly
            from the last rank that held them.

    Returns the accumulator that came home (this rank's rows: the sum of every other rank's
    contributions), or None without ``carry`` or with one rank.
    """
    packet = [t.contiguous() for t in packet]
    rank, world = layout.rank, layout.world_size
    nxt, prev = layout.peer((rank + 1) % world), layout.peer((rank - 1) % world)
    group = layout.group
    steps = world if steps is None else steps
    if not 1 <= steps <= world:
        raise ValueError(f"steps must be between 1 and the world size {world}, got {steps}")
    current = packet
    outgoing_carry = None       # accumulator computed at the previous step, to forward now
    for step in range(steps):
        source = (rank - step) % world
        ops = []
        incoming = None
        if step < steps - 1:
            incoming = _buffers_for(packet, token_dims, layout.counts[(rank - step - 1) % world])
            ops += [dist.P2POp(dist.isend, t, nxt, group, tag) for tag, t in enumerate(current)]
        if carry and outgoing_carry is not None:
            ops.append(dist.P2POp(dist.isend, outgoing_carry, nxt, group, _CARRY_TAG))
        if incoming is not None:
            ops += [dist.P2POp(dist.irecv, b, prev, group, tag) for tag, b in enumerate(incoming)]
        carry_in = None
        if carry and step >= 2:  # the accumulator of this step's shard, from the previous rank
            carry_in = torch.empty(_carry_shape(carry_like, layout.counts[source]), dtype=carry_like.dtype,
                                   device=carry_like.device)
            ops.append(dist.P2POp(dist.irecv, carry_in, prev, group, _CARRY_TAG))
        works = _start(ops)
        contribution = visit(source, current)
        _wait(works, layout, step)
        if carry and step >= 1:
            if contribution is None:
                raise RuntimeError("a carrying ring visitor must return a contribution for every other rank's shard")
            outgoing_carry = (contribution if carry_in is None else contribution + carry_in).contiguous()
        if incoming is not None:
            current = incoming
    if not carry or steps == 1:
        return None
    # the last shard's owner is `steps - 1` ranks back (the next rank after a full ring)
    owner = layout.peer((rank - steps + 1) % world)
    holder = layout.peer((rank + steps - 1) % world)
    home = torch.empty(_carry_shape(carry_like, layout.n_local), dtype=carry_like.dtype, device=carry_like.device)
    works = _start([dist.P2POp(dist.isend, outgoing_carry, owner, group, _CARRY_TAG),
                    dist.P2POp(dist.irecv, home, holder, group, _CARRY_TAG)])
    _wait(works, layout, steps)
    return home
