"""Renders: shapes, value ranges, the component → channel mapping, files written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spectral_kernels.render import (diverging_colormap, eigenvector_grid, eigenvector_rgb, palette,
                                     percentile_normalize, save_png, segmentation_overlay)


def _eig(rng, h=5, w=7, k=6):
    return torch.randn(h, w, k, generator=rng, dtype=torch.float64)


def test_eigenvector_rgb_maps_components_1_to_3(rng):
    e = _eig(rng)
    rgb = eigenvector_rgb(e)
    assert rgb.shape == (5, 7, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # channel c is an increasing function of component c+1 (component 0 is not used)
    for c in range(3):
        comp = e[..., c + 1].numpy().ravel()
        order = np.argsort(comp)
        assert (np.diff(rgb[..., c].ravel()[order]) >= -1e-12).all()
    e2 = e.clone()
    e2[..., 0] = torch.randn(5, 7, generator=rng, dtype=torch.float64)
    assert np.allclose(eigenvector_rgb(e2), rgb)
    # percentile normalisation spans [0, 1]
    assert rgb.reshape(-1, 3).min(0) == pytest.approx([0, 0, 0]) and rgb.reshape(-1, 3).max(0) == pytest.approx([1, 1, 1])


def test_eigenvector_rgb_upsamples_and_handles_few_components(rng):
    e = _eig(rng, k=3)  # only components 0..2: blue channel stays 0
    rgb = eigenvector_rgb(e, size=(50, 70))
    assert rgb.shape == (50, 70, 3) and float(rgb[..., 2].max()) == 0.0
    assert 0 <= rgb.min() and rgb.max() <= 1
    const = np.ones((4, 4, 4))  # constant components: no division by zero
    assert np.isfinite(eigenvector_rgb(const)).all()
    with pytest.raises(ValueError, match="NaN"):
        eigenvector_rgb(np.full((2, 2, 4), np.nan))
    with pytest.raises(ValueError, match="token grid"):
        eigenvector_rgb(np.ones((2, 2, 2, 2)))


def test_percentile_normalize_clips_outliers():
    a = np.concatenate([np.linspace(0, 1, 1000), [100.0]])[:, None]
    n = percentile_normalize(a, (0, 99))
    assert n.min() == 0 and n.max() == 1 and n[-1, 0] == 1 and n[500, 0] < 0.6


def test_eigenvector_grid_layout(rng):
    e = _eig(rng, h=4, w=6, k=10)
    pic = eigenvector_grid(e, n=6, cols=4, pad=2)
    assert pic.shape == (2 * 4 + 2, 4 * 6 + 3 * 2, 3) and pic.min() >= 0 and pic.max() <= 1
    assert (pic[4:6] == 1).all()  # white padding row between tile rows
    big = eigenvector_grid(e, n=3, cols=3, tile_size=(8, 12), pad=0)
    assert big.shape == (8, 36, 3)
    # zero maps to white, sign to red/blue
    np.testing.assert_allclose(diverging_colormap(np.array(0.0)), [1, 1, 1])
    assert diverging_colormap(np.array(1.0))[0] > diverging_colormap(np.array(1.0))[2]
    assert diverging_colormap(np.array(-1.0))[2] > diverging_colormap(np.array(-1.0))[0]
    with pytest.raises(ValueError, match="no components"):
        eigenvector_grid(e, start=10)


def test_segmentation_overlay(rng):
    img = torch.rand(3, 20, 30, generator=rng)
    labels = np.array([[0, 0, 1], [2, 2, 1]])
    over = segmentation_overlay(img, labels, alpha=1.0, boundaries=False)
    assert over.shape == (20, 30, 3) and over.min() >= 0 and over.max() <= 1
    cols = palette(3)
    np.testing.assert_allclose(over[0, 0], cols[0])
    np.testing.assert_allclose(over[19, 0], cols[2])
    np.testing.assert_allclose(over[0, 29], cols[1])
    assert len({tuple(c) for c in np.round(cols, 6)}) == 3
    # alpha 0 and no boundaries gives the image back; boundaries are drawn in black
    np.testing.assert_allclose(segmentation_overlay(img, labels, alpha=0.0, boundaries=False),
                               img.permute(1, 2, 0).numpy().astype(np.float64), atol=1e-7)
    edged = segmentation_overlay(img, labels, alpha=0.5)
    assert (edged[9, 0] == 0).all() and not (edged[0, 0] == 0).all()
    with pytest.raises(ValueError, match="labels"):
        segmentation_overlay(img, labels.astype(float))
    with pytest.raises(ValueError, match="alpha"):
        segmentation_overlay(img, labels, alpha=2)


def test_save_png_roundtrip(tmp_path, rng):
    pic = eigenvector_rgb(_eig(rng), size=(10, 14))
    path = save_png(tmp_path / "sub" / "rgb.png", pic)
    back = np.asarray(Image.open(path))
    assert back.shape == (10, 14, 3) and back.dtype == np.uint8
    assert np.abs(back / 255.0 - pic).max() <= 0.5 / 255 + 1e-9
    save_png(tmp_path / "grey.png", np.zeros((3, 4), np.uint8))
    assert Image.open(tmp_path / "grey.png").size == (4, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_png(tmp_path / "bad.png", np.full((2, 2, 3), 1.5))
    with pytest.raises(ValueError, match="picture"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 5)))
