"""timm vision transformers (DINO, MAE, DeiT, …): the fused ``qkv`` Linear of each block's Attention.

``TimmViT(model)`` wraps a timm ``VisionTransformer`` instance; ``TimmViT.from_name(name)``
creates one with ``timm.create_model(name, pretrained=True, dynamic_img_size=True)`` (this
downloads weights). timm is imported only there, with a clear error when it is missing.
Note: timm imports torchvision at import time, so timm needs a torchvision build that
matches the installed torch.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, CaptureModel, as_pair, optional_import
from .hooks import AttentionSite, fixed_grid


def import_timm():
    return optional_import("timm", "timm models need the 'timm' package (and a torchvision matching your torch)")



class TimmViT(CaptureModel):
    """Adapter for a timm ``VisionTransformer`` (plain ``Attention`` blocks with a fused qkv)."""

    def __init__(self, model: nn.Module, *, name: str | None = None, device=None,
                 dtype: torch.dtype = torch.float32, image_size=None):
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "patch_embed"):
            raise TypeError(f"expected a timm VisionTransformer (with .blocks and .patch_embed), "
                            f"got {type(model).__name__}")
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise TypeError(f"block {i}: expected a timm Attention with a fused qkv Linear")
            if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or \
                    not isinstance(getattr(attn, "k_norm", nn.Identity()), nn.Identity):
                raise ValueError(f"block {i}: q/k normalisation (qk_norm=True) is not supported: the "
                                 "captured q, k would differ from those the layer attends with")
            if getattr(attn, "gate", None) is not None:
                raise ValueError(f"block {i}: gated attention is not supported")
        self.network = model
        self.name = name or f"timm:{type(model).__name__}"
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.network.to(self.device, dtype).eval()
        self.patch_size = as_pair(model.patch_embed.patch_size)[0]
        if not getattr(model, "dynamic_img_size", False):
            self.fixed_size = as_pair(model.patch_embed.img_size)  # position table fixed to this size
        self.image_size = image_size if image_size is not None else as_pair(model.patch_embed.img_size)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))

    @classmethod
    def from_name(cls, name: str, *, device="cpu", **kw) -> "TimmViT":
        timm = import_timm()
        model = timm.create_model(name, pretrained=True, dynamic_img_size=True, num_classes=0)
        return cls(model, name=f"timm:{name}", device=device, **kw)

    def sites(self, pixels: torch.Tensor) -> list[AttentionSite]:
        p = as_pair(self.network.patch_embed.patch_size)
        grid = fixed_grid((pixels.shape[-2] // p[0], pixels.shape[-1] // p[1]))
        n_extra = int(getattr(self.network, "num_prefix_tokens", 1))
        sites = []
        for i, block in enumerate(self.network.blocks):
            attn = block.attn

            def out_proj(y, attn=attn):
                return attn.proj_drop(attn.proj(attn.norm(y)))
            sites.append(AttentionSite(f"blocks.{i}", {"qkv": attn.qkv}, attn.num_heads, grid, n_extra=n_extra,
                                       scale=float(attn.scale), module=attn, out_proj=out_proj))
        return sites

    def run(self, pixels: torch.Tensor, **kw) -> None:
        if kw:
            raise TypeError(f"{self.name} takes no run options, got {sorted(kw)}")
        self.network.forward_features(pixels)
