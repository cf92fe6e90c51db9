"""From the trained tables to per-image eigenvectors, orthogonalised jointly over the dataset.

The single-image solver orthogonalises one image's X (SVD of its column-normalised
features). Over a dataset the components must mean the same thing in every image, so the
orthogonalisation is one SVD of the whole dataset's column-normalised X (all images' tokens
stacked, the normalisation the dataset objective uses), done through its K×K Gram matrix:
X̂ = U S Vᵀ ⇒ U·S = X̂ V, so image i's eigenvectors are X̂_i V — no (n_images·N)×K SVD.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["joint_orthogonalize", "write_image_results"]


@torch.no_grad()
def joint_orthogonalize(features: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """features (n_images, N, K) ≥ 0 → (U·S (n_images, N, K), singular values (K,)).

    Columns are normalised over all n_images·N tokens; components are ordered by singular
    value (component 0 the trivial, nearly constant one) and signed so that each sums to ≥ 0.
    """
    n, _, kk = features.shape
    x = features.to(torch.float64)
    sq = torch.zeros(kk, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        sq += x[i:i + chunk].pow(2).sum((0, 1))
    inv_norm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    gram = torch.zeros(kk, kk, dtype=torch.float64, device=x.device)
    total = torch.zeros(kk, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        xi = (x[i:i + chunk] * inv_norm).flatten(0, 1)
        gram += xi.T @ xi
        total += xi.sum(0)
    evals, vecs = torch.linalg.eigh(gram)
    evals, vecs = evals.flip(0), vecs.flip(1)
    signs = torch.where(total @ vecs < 0, -1.0, 1.0).to(vecs)
    vecs = vecs * signs
    out = torch.empty_like(features, dtype=torch.float32)
    for i in range(0, n, chunk):
        out[i:i + chunk] = ((x[i:i + chunk] * inv_norm) @ vecs).float()
    return out, evals.clamp_min(0).sqrt().float()


def write_image_results(out_dir: str, names: list[str], eigenvectors: Tensor, features: Tensor,
                        singular_values: Tensor, eigenvalues: Tensor | None = None) -> list[str]:
    """DIR/<name>.npz per image: eigenvectors (h, w, K), features (h, w, K), singular_values (K,)
    and, when computed, eigenvalues (K,); written atomically (temporary file, then rename)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    sv = singular_values.cpu().numpy()
    for i, name in enumerate(names):
        arrays = {"eigenvectors": eigenvectors[i].cpu().numpy(), "features": features[i].cpu().numpy(),
                  "singular_values": sv}
        if eigenvalues is not None:
            arrays["eigenvalues"] = eigenvalues[i].cpu().numpy()
        path = os.path.join(out_dir, f"{name}.npz")
        tmp = os.path.join(out_dir, f".{name}.npz.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        paths.append(path)
    return paths
