"""A plain-torch DINOv2-style vision transformer (pre-norm blocks with LayerScale).

Architecture only: weights come from ``onnx_weights`` (the built-in default) or any state
dict with the same names. q, k and v are separate ``nn.Linear`` modules so the capture
hooks (``hooks.py``) see each projection's output directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention: out(softmax(τ q kᵀ) v), τ = head_dim^-½."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split_heads(p(x)) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """x + γ₁·attn(LN(x)); x + γ₂·mlp(LN(x)) — the DINOv2 block with LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patch embedding + CLS token + position embeddings + pre-norm blocks + final LayerNorm.

    ``pos_grid`` is the grid the position embeddings were trained on (37×37 for DINOv2 at
    518 px); other image sizes interpolate them bicubically (align_corners=False, no
    antialiasing), as DINOv2 does.
    """

    def __init__(self, *, patch_size: int = 14, dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, pos_grid: tuple[int, int] = (37, 37), eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.n_extra = 1
        self.pos_grid = tuple(pos_grid)
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.pos_grid:
            return self.patch_pos
        h0, w0 = self.pos_grid
        table = self.patch_pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(self.patch_pos.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), ImageNet-normalised → final normalised tokens (B, 1 + h·w, dim)."""
        grid = self.grid_of(*pixels.shape[-2:])
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        x = x + torch.cat([self.cls_pos, self.position_embeddings(grid)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def infer_pos_grid(n_positions: int) -> tuple[int, int]:
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise ValueError(f"{n_positions} position embeddings do not form a square grid")
    return side, side
