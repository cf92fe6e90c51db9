"""Hugging Face transformers ViT / DINOv2 (with or without registers): the query/key/value Linears.

``HFViT(model)`` wraps a ``ViTModel``/``Dinov2Model``/``Dinov2WithRegistersModel`` (or a
model containing one); ``HFViT.from_name(hub_id)`` loads one with ``AutoModel`` (this
downloads weights). Both attention layouts are handled: transformers ≥ 5 (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` on one module) and 4.x (``attention.query/key/value``
plus ``output.dense``).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, CaptureModel, as_pair, optional_import
from .hooks import AttentionSite, fixed_grid


def import_transformers():
    return optional_import("transformers", "Hugging Face models need the 'transformers' package")



def _attention_layers(model: nn.Module):
    """(name, attention module, {q, k, v}, output projection) for each self-attention layer."""
    found = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            found.append((name, module, {"q": module.q_proj, "k": module.k_proj, "v": module.v_proj},
                          module.o_proj))
        else:
            inner, output = getattr(module, "attention", None), getattr(module, "output", None)
            if inner is not None and output is not None and isinstance(getattr(output, "dense", None), nn.Linear) \
                    and all(isinstance(getattr(inner, a, None), nn.Linear) for a in ("query", "key", "value")):
                found.append((name, module, {"q": inner.query, "k": inner.key, "v": inner.value}, output.dense))
    return found


class HFViT(CaptureModel):
    """Adapter for transformers vision transformers with a CLS token (and optional registers)."""

    def __init__(self, model: nn.Module, *, name: str | None = None, device=None,
                 dtype: torch.dtype = torch.float32, image_size=224, mean=None, std=None):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "patch_size") or not hasattr(config, "num_attention_heads"):
            raise TypeError(f"expected a transformers vision model with a ViT-style config, got {type(model).__name__}")
        self.layers = _attention_layers(model)
        if not self.layers:
            raise TypeError(f"no query/key/value attention layers found in {type(model).__name__}")
        self.network = model
        self.config = config
        self.name = name or f"hf:{config.model_type}"
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.network.to(self.device, dtype).eval()
        self.patch_size = as_pair(config.patch_size)[0]
        self.image_size = image_size
        self.n_extra = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        params = inspect.signature(model.forward).parameters
        self._run_kw = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}

    @classmethod
    def from_name(cls, hub_id: str, *, device="cpu", **kw) -> "HFViT":
        transformers = import_transformers()
        model = transformers.AutoModel.from_pretrained(hub_id)
        if "mean" not in kw:
            try:  # the checkpoint's own normalisation (google/vit-* use 0.5, DINOv2 ImageNet)
                proc = transformers.AutoImageProcessor.from_pretrained(hub_id)
                kw.update(mean=proc.image_mean, std=proc.image_std)
            except Exception:  # no processor config: keep the ImageNet statistics
                pass
        return cls(model, name=f"hf:{hub_id}", device=device, **kw)

    def sites(self, pixels: torch.Tensor) -> list[AttentionSite]:
        p = as_pair(self.config.patch_size)
        grid = fixed_grid((pixels.shape[-2] // p[0], pixels.shape[-1] // p[1]))
        heads = int(self.config.num_attention_heads)
        sites = []
        for name, module, proj, out in self.layers:
            head_dim = proj["q"].out_features // heads
            scale = float(getattr(module, "scaling", head_dim ** -0.5))
            sites.append(AttentionSite(name, proj, heads, grid, n_extra=self.n_extra, scale=scale,
                                       module=module, out_proj=out))
        return sites

    def run(self, pixels: torch.Tensor, **kw) -> None:
        if kw:
            raise TypeError(f"{self.name} takes no run options, got {sorted(kw)}")
        self.network(pixel_values=pixels, **self._run_kw)
