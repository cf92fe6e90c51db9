"""diffusers Stable Diffusion UNet: self-attention (``attn1``) of every transformer block.

All resolutions are captured (down, mid and up blocks); each layer's grid is the latent
grid halved as many times as its resolution level. One capture = one noisy forward pass
(DESIGN.md §3): the image is VAE-encoded (posterior mean × scaling factor), noised to a
timestep t drawn uniformly from {0, …, 250} unless given, and the UNet is run with an
empty-prompt text embedding (or a given one). The timestep is stored in each capture's
``meta["timestep"]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import CaptureModel, optional_import
from .hooks import AttentionSite, downsampled_grid

DEFAULT_T_RANGE = (0, 250)


def import_diffusers():
    return optional_import("diffusers", "Stable Diffusion models need the 'diffusers' package")


def sd_alphas_cumprod(n_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's "scaled_linear" DDPM schedule (used when no scheduler is given)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sample_timestep(t_range=DEFAULT_T_RANGE, generator: torch.Generator | None = None) -> int:
    """t ~ U{t_range[0], …, t_range[1]} (inclusive), as the paper samples its noise levels."""
    lo, hi = int(t_range[0]), int(t_range[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"t_range must satisfy 0 <= low <= high, got {t_range}")
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def noise_latents(latents: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM forward process: √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, ε ~ N(0, I)."""
    if not 0 <= t < len(alphas_cumprod):
        raise ValueError(f"timestep must lie in [0, {len(alphas_cumprod) - 1}], got {t}")
    a = float(alphas_cumprod[t])
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    return a ** 0.5 * latents + (1 - a) ** 0.5 * noise


def _is_self_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Linear) for a in ("to_q", "to_k", "to_v")) \
        and isinstance(getattr(module, "to_out", None), nn.ModuleList) and hasattr(module, "heads")


class StableDiffusionUNet(CaptureModel):
    """Adapter for a ``UNet2DConditionModel`` plus its ``AutoencoderKL``.

    ``text_embedding`` (1, L, C) conditions the UNet (default: zeros of shape
    (1, 77, cross_attention_dim); ``from_name`` uses the CLIP embedding of the empty
    prompt). ``alphas_cumprod`` is the noise schedule (default SD's scaled-linear one).
    """

    mean = (0.5, 0.5, 0.5)  # the VAE takes pixels in [-1, 1]
    std = (0.5, 0.5, 0.5)

    def __init__(self, unet: nn.Module, vae: nn.Module, *, name: str | None = None, device=None,
                 dtype: torch.dtype = torch.float32, image_size=512, text_embedding: torch.Tensor | None = None,
                 alphas_cumprod: torch.Tensor | None = None, t_range=DEFAULT_T_RANGE):
        if not hasattr(unet, "config") or not hasattr(unet.config, "down_block_types"):
            raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        if not hasattr(vae, "encode") or not hasattr(vae, "config"):
            raise TypeError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        self.unet, self.vae = unet, vae
        self.name = name or "sd:unet"
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.dtype = dtype
        for m in (unet, vae):
            m.to(self.device, dtype).eval()
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.down_block_types) - 1)
        self.patch_size = self.vae_factor * self.unet_factor  # the coarsest grid must be whole
        self.image_size = image_size
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        if text_embedding is None:
            text_embedding = torch.zeros(1, 77, int(unet.config.cross_attention_dim))
        self.text_embedding = text_embedding.to(self.device, dtype)
        self.alphas_cumprod = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).double().cpu()
        self.t_range = tuple(t_range)
        self.layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn1") and _is_self_attention(m)]
        if not self.layers:
            raise TypeError("no self-attention (attn1) layers found in the UNet")

    @classmethod
    def from_name(cls, repo_id: str, *, device="cpu", dtype=None, **kw) -> "StableDiffusionUNet":
        diffusers = import_diffusers()
        try:
            import transformers
        except ImportError as exc:
            raise ImportError("Stable Diffusion's text encoder needs 'transformers': pip install transformers") from exc
        dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
        unet = diffusers.UNet2DConditionModel.from_pretrained(repo_id, subfolder="unet")
        vae = diffusers.AutoencoderKL.from_pretrained(repo_id, subfolder="vae")
        scheduler = diffusers.DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(repo_id, subfolder="tokenizer")
        encoder = transformers.CLIPTextModel.from_pretrained(repo_id, subfolder="text_encoder")
        tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            embedding = encoder(tokens.input_ids)[0]
        return cls(unet, vae, name=f"sd:{repo_id}", device=device, dtype=dtype, text_embedding=embedding,
                   alphas_cumprod=scheduler.alphas_cumprod, **kw)

    def sites(self, pixels: torch.Tensor) -> list[AttentionSite]:
        latent_grid = (pixels.shape[-2] // self.vae_factor, pixels.shape[-1] // self.vae_factor)
        grid = downsampled_grid(latent_grid)
        sites = []
        for name, attn in self.layers:
            def out_proj(y, attn=attn):
                return attn.to_out[1](attn.to_out[0](y)) / attn.rescale_output_factor
            head_dim = attn.to_q.out_features // attn.heads
            sites.append(AttentionSite(name, {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v}, attn.heads, grid,
                                       scale=head_dim ** -0.5,  # SDPA's default, which the processor uses
                                       module=attn, out_proj=out_proj))
        return sites

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) in [-1, 1] → scaled latent posterior mean."""
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    def run(self, pixels: torch.Tensor, *, timestep: int | None = None, generator: torch.Generator | None = None,
            text_embedding: torch.Tensor | None = None) -> dict:
        t = sample_timestep(self.t_range, generator) if timestep is None else int(timestep)
        latents = noise_latents(self.encode(pixels), t, self.alphas_cumprod, generator)
        cond = self.text_embedding if text_embedding is None else text_embedding.to(self.device, self.dtype)
        cond = cond.expand(len(latents), -1, -1)
        self.unet(latents, torch.tensor([t] * len(latents), device=self.device), encoder_hidden_states=cond)
        return {"timestep": t}
