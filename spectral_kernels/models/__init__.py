"""Attention capture: images → per-layer q, k, v (``LayerCapture``) from pretrained models.

    from spectral_kernels.models import load_model
    model = load_model("dinov2-vits14-onnx")          # built-in, offline, CPU-friendly
    captures = model.capture("photo.jpg")              # list[LayerCapture], one per layer

Names: the built-in ``dinov2-vits14-onnx`` (alias ``dinov2``), ``timm:<timm model name>``,
``hf:<hub id>`` (transformers ViT/DINOv2) and ``sd:<hub id>`` (Stable Diffusion UNet).
``list_models()`` gives the built-in name and tested examples of the others. Library
adapters import their library only when used. ``wrap_model(module)`` adapts an already
constructed timm / transformers model.
"""
from __future__ import annotations

from .base import CaptureModel
from .capture import LayerCapture
from .hooks import AttentionSite

DEFAULT_MODEL = "dinov2-vits14-onnx"
_ALIASES = {"dinov2": DEFAULT_MODEL, "default": DEFAULT_MODEL}
_EXAMPLES = (
    "timm:vit_small_patch16_224.dino",
    "timm:vit_base_patch16_224.mae",
    "timm:deit_small_patch16_224.fb_in1k",
    "hf:facebook/dinov2-small",
    "hf:facebook/dinov2-base",
    "hf:google/vit-base-patch16-224-in21k",
    "sd:stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd:stabilityai/stable-diffusion-2-1-base",
)
_PREFIXES = ("timm:", "hf:", "sd:")

__all__ = ["load_model", "list_models", "wrap_model", "CaptureModel", "LayerCapture", "AttentionSite",
           "DEFAULT_MODEL"]


def list_models() -> list[str]:
    """The built-in model, then examples of the library-backed names (any timm / hub id works)."""
    return [DEFAULT_MODEL, *_EXAMPLES]


def load_model(name: str = DEFAULT_MODEL, *, device="cpu", **kw) -> CaptureModel:
    """A capture-ready model by name; keywords go to the adapter (e.g. ``image_size``, ``dtype``).

    Library-backed names download their weights through that library. Unknown names raise
    ValueError listing the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}; use wrap_model() for a module")
    key = _ALIASES.get(name, name)
    if key == DEFAULT_MODEL:
        from .dinov2_onnx import DinoV2Onnx
        return DinoV2Onnx(device=device, **kw)
    prefix, _, ident = key.partition(":")
    if key.startswith(_PREFIXES) and ident:
        if prefix == "timm":
            from .timm_adapter import TimmViT
            return TimmViT.from_name(ident, device=device, **kw)
        if prefix == "hf":
            from .transformers_adapter import HFViT
            return HFViT.from_name(ident, device=device, **kw)
        from .diffusers_adapter import StableDiffusionUNet
        return StableDiffusionUNet.from_name(ident, device=device, **kw)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())} "
                     f"(or any 'timm:<name>', 'hf:<hub id>', 'sd:<hub id>')")


def wrap_model(model, **kw) -> CaptureModel:
    """Adapt a constructed timm VisionTransformer or transformers ViT/DINOv2 model.

    (For a Stable Diffusion UNet, construct ``StableDiffusionUNet(unet, vae)`` directly.)
    """
    if isinstance(model, CaptureModel):
        return model
    module = type(model).__module__ or ""
    if module.startswith("timm"):
        from .timm_adapter import TimmViT
        return TimmViT(model, **kw)
    if module.startswith("transformers"):
        from .transformers_adapter import HFViT
        return HFViT(model, **kw)
    if module.startswith("diffusers"):
        raise TypeError("for a diffusers UNet use spectral_kernels.models.diffusers_adapter."
                        "StableDiffusionUNet(unet, vae)")
    raise TypeError(f"cannot adapt {type(model).__name__} (from {module!r}): expected a timm or transformers model")
