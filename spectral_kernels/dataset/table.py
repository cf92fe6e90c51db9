"""Per-image logit tables with a row-wise AdamW and a lazily applied EMA.

The official dataset code keeps one parameter per image (a ``ParameterList``) and calls
AdamW with gradients set to None between steps, so an image's moments and step count
advance only while it is in the batch, and its EMA copy is updated for every image after
every batch. Updating a full (n_images, K, h, w) table per step instead would cost O(dataset)
per step (100 M numbers for 1 000 images at K = 100): here both touch only the batch's rows.

* ``adam_step``: torch.optim.AdamW's formula (non-fused), with per-row step counts.
* EMA: between two visits of an image its parameters are constant, so the n skipped
  updates e ← m·e + (1−m)·p collapse to e ← p + (e − p)·mⁿ; ``ema_sync`` applies that
  when a row is next touched (and for all rows at the end).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LogitTableState"]


class LogitTableState:
    """Table (n_images, K, h, w) plus AdamW moments, per-row step counts and EMA."""

    def __init__(self, table: Tensor, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, ema: float | None = None):
        self.table = table
        self.lr, self.betas, self.eps, self.weight_decay, self.ema_decay = lr, betas, eps, weight_decay, ema
        self.exp_avg = torch.zeros_like(table)
        self.exp_avg_sq = torch.zeros_like(table)
        self.steps = torch.zeros(table.shape[0], dtype=torch.long, device=table.device)
        self.ema = None if ema is None else table.clone()
        self.ema_synced = torch.zeros(table.shape[0], dtype=torch.long, device=table.device)

    # ------------------------------------------------------------------ optimiser
    def rows(self, index: Tensor) -> Tensor:
        """The batch's logits as a fresh leaf tensor (its .grad is the batch's gradient)."""
        return self.table[index].detach().requires_grad_(True)

    @torch.no_grad()
    def adam_step(self, index: Tensor, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        p, m, v = self.table[index], self.exp_avg[index], self.exp_avg_sq[index]
        self.steps[index] += 1
        step = self.steps[index].to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
        p.mul_(1.0 - self.lr * self.weight_decay)
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = self.lr / (1.0 - beta1 ** step)
        denom = (v.sqrt() / (1.0 - beta2 ** step).sqrt()).add_(self.eps)
        p.addcdiv_(m * step_size, denom, value=-1.0)
        self.table[index], self.exp_avg[index], self.exp_avg_sq[index] = p, m, v

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def ema_sync(self, index: Tensor | None, step: int) -> None:
        """Bring EMA rows up to outer step ``step`` (their parameters were constant meanwhile)."""
        if self.ema is None:
            return
        if index is None:
            index = torch.arange(self.table.shape[0], device=self.table.device)
        gap = (step - self.ema_synced[index]).to(self.table.dtype).view(-1, *([1] * (self.table.dim() - 1)))
        p, e = self.table[index], self.ema[index]
        self.ema[index] = p + (e - p) * self.ema_decay ** gap
        self.ema_synced[index] = step

    @torch.no_grad()
    def ema_update(self, index: Tensor, step: int) -> None:
        """The official per-batch update e ← m·e + (1−m)·p for the batch's rows, ending step ``step``."""
        if self.ema is None:
            return
        m = self.ema_decay
        self.ema[index] = self.ema[index] * m + self.table[index] * (1.0 - m)
        self.ema_synced[index] = step + 1

    def final(self, steps: int) -> Tensor:
        """The table the results are read from: the EMA (synced to the end) or the raw table."""
        if self.ema is None:
            return self.table
        self.ema_sync(None, steps)
        return self.ema

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"table": self.table, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps,
                "ema": self.ema, "ema_synced": self.ema_synced}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            current = getattr(self, name)
            if (current is None) != (value is None) or (value is not None and current.shape != value.shape):
                raise ValueError(f"checkpoint table state {name!r} does not match this run")
            setattr(self, name, None if value is None else value.to(self.table.device))
