"""The spectral-kernels command line, run in-process on bundled images at small sizes."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spectral_kernels.cli import main
from spectral_kernels.images import bundled_image

SMALL = ["--image-size", "112", "--no-progress"]  # 112 px → an 8×8 DINOv2 token grid


def _save_png(path, name="chelsea"):
    pixels = (bundled_image(name).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _check_png(path):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.mode == "RGB" and min(im.size) >= 8


def test_analyze_exact_both_graphs_writes_npz_and_pictures(tmp_path, capsys):
    photo = _save_png(tmp_path / "my cat.png")
    out = tmp_path / "out"
    code = main(["analyze", str(photo), "--graph", "both", "--n-eig", "5", "--segments", "3",
                 "--out", str(out), *SMALL])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("my cat:")
    for stem in ("my cat",):
        with np.load(out / f"{stem}.npz") as z:
            assert {"eigenvectors", "eigenvalues", "eigenvectors_vv", "eigenvalues_vv", "segments"} <= set(z.files)
            assert list(z["graphs"]) == ["kq", "vv"]
            for suffix in ("", "_vv"):
                vectors, values = z[f"eigenvectors{suffix}"], z[f"eigenvalues{suffix}"]
                h, w = vectors.shape[:2]
                assert vectors.shape[2] == 5 and values.shape == (5,)
                assert h * w >= 64 and min(h, w) == 8  # shorter side 112 px / 14 px patches
                assert np.isfinite(vectors).all() and np.isfinite(values).all()
                assert np.all(np.diff(values) <= 1e-5), values  # exact solver: descending
                # eigenvectors of a symmetric operator: orthonormal columns
                gram = vectors.reshape(-1, 5).T.astype(np.float64) @ vectors.reshape(-1, 5)
                np.testing.assert_allclose(gram, np.eye(5), atol=1e-3)
                assert z[f"segments{suffix}"].shape == (h, w)
                assert len(np.unique(z[f"segments{suffix}"])) == 3
        for graph in ("kq", "vv"):
            for kind in ("rgb", "eigenvectors", "segments"):
                _check_png(out / f"{stem}_{graph}_{kind}.png")


def test_analyze_gradient_descent_one_graph_two_images(tmp_path, capsys):
    out = tmp_path / "gd"
    code = main(["analyze", "skimage:rocket", "skimage:rocket", "--solver", "gd", "--steps", "3", "--graph", "vv",
                 "--n-eig", "4", "--out", str(out), *SMALL])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["rocket", "rocket_1"]  # no output overwrites another
    for stem in ("rocket", "rocket_1"):
        with np.load(out / f"{stem}.npz") as z:
            assert "eigenvectors_vv" not in z.files and list(z["graphs"]) == ["vv"]
            assert z["eigenvectors"].shape[2] == 4 and z["eigenvalues"].shape == (4,)
            assert np.isfinite(z["eigenvectors"]).all() and np.isfinite(z["eigenvalues"]).all()
    assert sorted(p.name for p in out.glob("rocket_vv_*.png")) == [
        "rocket_vv_eigenvectors.png", "rocket_vv_rgb.png", "rocket_vv_segments.png"]


def _usage_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_file_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(capsys, ["analyze", str(tmp_path / "nope.jpg"), "--out", str(tmp_path), *SMALL])
    assert "not found" in err and "nope.jpg" in err


def test_unreadable_file_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture")
    err = _usage_error(capsys, ["analyze", str(bad), "--out", str(tmp_path), *SMALL])
    assert "unreadable image" in err and "broken.png" in err


def test_unknown_model_and_bundled_image_are_usage_errors(tmp_path, capsys):
    err = _usage_error(capsys, ["analyze", "--model", "no-such-model", "--out", str(tmp_path), *SMALL])
    assert "unknown model 'no-such-model'" in err
    err = _usage_error(capsys, ["analyze", "skimage:unicorn", "--out", str(tmp_path), *SMALL])
    assert "skimage:unicorn" in err and "skimage:astronaut" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")
def test_unavailable_device_and_backend_are_usage_errors(tmp_path, capsys):
    err = _usage_error(capsys, ["analyze", "--device", "cuda", "--out", str(tmp_path), *SMALL])
    assert "--device cuda" in err and "no CUDA device" in err
    err = _usage_error(capsys, ["analyze", "--backend", "cuda", "--out", str(tmp_path), *SMALL])
    assert "--backend cuda" in err and "not available" in err


def test_bad_k_is_a_usage_error(tmp_path, capsys):
    err = _usage_error(capsys, ["analyze", "--n-eig", "200", "--out", str(tmp_path), *SMALL])
    assert "--n-eig 200" in err and "tokens" in err
    err = _usage_error(capsys, ["analyze", "--n-eig", "1", "--out", str(tmp_path), *SMALL])
    assert "--n-eig 1" in err and "K ≥ 2" in err
    err = _usage_error(capsys, ["analyze", "--steps", "5", "--out", str(tmp_path), *SMALL])
    assert "--steps" in err and "gd" in err
    with pytest.raises(SystemExit) as exc:  # argparse: K must parse as ≥ 2 segments
        main(["analyze", "--segments", "1"])
    assert exc.value.code == 2
    assert "--segments" in capsys.readouterr().err


def test_dataset_subcommand_runs_on_a_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _save_png(folder / "a.png", "chelsea")
    _save_png(folder / "b.png", "coffee")
    out = tmp_path / "ds"
    code = main(["dataset", str(folder), "--out", str(out), "--n-eig", "3", "--steps", "1", "--batch-images", "2",
                 "--image-size", "56", "--mode", "dense", "--no-progress", "--no-resume"])
    assert code == 0, capsys.readouterr().err
    assert "2 images" in capsys.readouterr().out
    for stem in ("a", "b"):
        with np.load(out / f"{stem}.npz") as z:
            assert z["eigenvectors"].shape == (4, 4, 3) and np.isfinite(z["eigenvectors"]).all()
    err = _usage_error(capsys, ["dataset", str(tmp_path / "missing"), "--out", str(out)])
    assert "not found" in err
    # a selection of layers (index from the end, or name) and heads: the cached features hold just those
    out2 = tmp_path / "ds2"
    code = main(["dataset", str(folder), "--out", str(out2), "--n-eig", "3", "--steps", "1", "--batch-images", "2",
                 "--image-size", "56", "--mode", "dense", "--no-progress", "--layers=-1,blocks.2",
                 "--heads", "0,5"])
    assert code == 0, capsys.readouterr().err
    cached = torch.load(next((out2 / "_run" / "features").glob("*.pt")), weights_only=False)
    assert sorted(cached) == ["blocks.11", "blocks.2"]
    assert all(layer["a"].shape[0] == 2 for layer in cached.values())  # (heads, tokens, d)
    err = _usage_error(capsys, ["dataset", str(folder), "--out", str(out2), "--layers", "99", "--no-resume",
                                "--no-progress"])
    assert "layers" in err and "out of range" in err
    with pytest.raises(SystemExit):
        main(["dataset", str(folder), "--heads", "a,b"])
    assert "--heads" in capsys.readouterr().err


def test_backends_and_bench(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "available backends: dense, torch" in out and "torch " in out and "triton " in out
    assert main(["bench", "--device", "cpu", "--sizes", "64,96", "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["64", "96"]
    for row in rows:
        sdpa, ours, ratio = float(row[1]), float(row[2]), float(row[3])
        assert sdpa > 0 and ours > 0 and ratio == pytest.approx(ours / sdpa, rel=0.02, abs=0.01)


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "spectral_kernels", "analyze", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--graph" in done.stdout and "eigenvectors_vv" in done.stdout
