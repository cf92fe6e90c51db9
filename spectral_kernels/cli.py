"""The ``spectral-kernels`` command line: images → "what" and "where" eigenvectors, renders, benchmarks.

    spectral-kernels analyze [IMAGE ...]      one image at a time (default: a bundled photograph)
    spectral-kernels dataset DIR              many images in one embedding (spectral_kernels.dataset)
    spectral-kernels bench                    the primitive vs torch SDPA on this device
    spectral-kernels backends                 which kernel backends load here, and versions

Every subcommand is a function ``run_<name>(args) -> int``; ``main(argv)`` parses and
dispatches. Problems a user can fix (a missing file, an unknown model, a bad K) raise
``UsageError``: ``main`` prints one line and returns exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------- defaults
# Chosen so the default `analyze` run (model load, capture, both graphs, renders) stays well
# under a minute on a 2-core CPU: 224 px → a 16×16 token grid; the exact eigensolver
# converges in a handful of block iterations there.
DEFAULT_IMAGE = "skimage:astronaut"
DEFAULT_OUT = "spectral_output"
DEFAULT_N_EIG = 8
DEFAULT_IMAGE_SIZE = 224
DEFAULT_GD_STEPS = 300
EIGSH_TOL = 1e-4          # residual/|λ|: ample for pictures and k-means, a few iterations at most
SEGMENT_K_RANGE = range(2, 9)
GRAPHS = ("kq", "vv", "both")
SOLVERS = ("exact", "gd")
DEVICES = ("cpu", "cuda")
BACKEND_CHOICES = ("auto", "torch", "triton", "cuda", "dense")
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command's inputs; reported as one line with exit code 2."""


# ---------------------------------------------------------------------------- argument types
def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _segments(text: str):
    return None if text == "auto" else _int_at_least(text, 2, "an integer ≥ 2 or 'auto'")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated token counts, got {text!r}")
    return sizes


def _index_list(text: str) -> list:
    """Comma-separated layer/head selectors: integers (negative counts from the end) or names."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated indices, got {text!r}")
    return [int(part) if part.lstrip("-").isdigit() else part for part in items]


def _head_list(text: str) -> list[int]:
    heads = _index_list(text)
    if not all(isinstance(h, int) for h in heads):
        raise argparse.ArgumentTypeError(f"expected comma-separated head indices, got {text!r}")
    return heads


# ---------------------------------------------------------------------------- shared checks
def _torch_device(name: str):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    return torch.device(name)


def _check_backend(backend: str, device) -> None:
    from .ops import available_backends
    from .ops.backends import backend_supports
    import torch
    if backend == "auto":
        return
    available = available_backends()
    if backend not in available:
        raise UsageError(f"--backend {backend}: not available here (available: {', '.join(available)})")
    if not backend_supports(backend, device, torch.float32):
        raise UsageError(f"--backend {backend}: does not run on {device.type} tensors")


def _load_model(name: str, device, **kw):
    from .models import load_model
    try:
        return load_model(name, device=device, **kw)
    except ValueError as exc:  # unknown name
        raise UsageError(str(exc)) from None
    except ImportError as exc:  # optional library (timm, transformers, diffusers) or ONNX file missing
        raise UsageError(f"model {name!r} cannot be loaded: {exc}") from None
    except OSError as exc:  # weights that could not be downloaded or read
        raise UsageError(f"model {name!r}: cannot load its weights: {exc}") from None


def _progress(iterable, *, enabled: bool, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True, **kw)


def _say(line: str, *, file=None) -> None:
    """Print a line without tearing an active progress bar."""
    from tqdm.auto import tqdm
    tqdm.write(line, file=file or sys.stdout)


# ---------------------------------------------------------------------------- analyze
@dataclass
class ImageInput:
    """One image to analyse: the name its outputs get and the (3, H, W) tensor in [0, 1]."""
    stem: str
    pixels: object


def resolve_image(spec: str) -> ImageInput:
    """``skimage:NAME`` (a bundled photograph) or a file path → ImageInput; UsageError otherwise."""
    from .images import bundled_image, bundled_images, load_image
    if spec.startswith("skimage:"):
        name = spec.partition(":")[2]
        if name not in bundled_images():
            raise UsageError(f"unknown bundled image {spec!r}; known: "
                             + ", ".join(f"skimage:{n}" for n in bundled_images()))
        return ImageInput(name, bundled_image(name))
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"image file not found: {spec}")
    if not path.is_file():
        raise UsageError(f"not a file: {spec}")
    try:
        return ImageInput(path.stem, load_image(path))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"unreadable image {spec}: {exc}") from None


def _unique_stems(inputs: list[ImageInput]) -> None:
    """Give repeated stems a numeric suffix so no output overwrites another."""
    seen: dict[str, int] = {}
    for item in inputs:
        count = seen.get(item.stem, 0)
        seen[item.stem] = count + 1
        if count:
            item.stem = f"{item.stem}_{count}"


@dataclass
class GraphResult:
    graph: str
    eigenvectors: np.ndarray    # (h, w, K) on the token grid
    eigenvalues: np.ndarray     # (K,)
    segments: np.ndarray        # (h, w) k-means labels


def solve_exact(captures, graph: str, n_eig: int, *, backend: str, seed: int, progress: bool):
    """Top-K eigenpairs of Σ_l G_lᵀ M_l G_l (layer and head mean of the NCut operators)."""
    import torch
    from .eigsh import eigsh
    from .operators import multilayer_operator
    op = multilayer_operator(captures, graph=graph, normalize="sym", backend=backend)
    values, vectors = eigsh(op, n_eig, tol=EIGSH_TOL, progress=progress,
                            generator=torch.Generator().manual_seed(seed))
    return vectors.reshape(*_token_grid(captures), n_eig), values


def solve_gd(captures, graph: str, n_eig: int, *, steps: int, backend: str, seed: int, progress: bool):
    """The paper's gradient descent (official random-walk objective); eigenvalues are the
    Rayleigh quotients of the orthogonalised components, mean over layers and heads."""
    import torch
    from .solver import SpectralSolver
    result = SpectralSolver(n_eig=n_eig, steps=steps, graph=graph, seed=seed, progress=progress,
                            backend=backend).fit(captures)
    quotients = torch.stack([q.float().mean(dim=(0, 1)) for q in result.eigenvalues.values()])
    return result.eigenvectors, quotients.mean(0)


def _token_grid(captures) -> tuple[int, int]:
    return max((tuple(c.grid) for c in captures), key=lambda g: g[0] * g[1])


def _check_k(args, n_tokens: int) -> None:
    # eigsh needs k < N; the segmentation needs 2 ≤ segments ≤ tokens.
    if args.n_eig >= n_tokens:
        raise UsageError(f"--n-eig {args.n_eig} must be smaller than the number of tokens ({n_tokens}); "
                         "lower it or raise --image-size")
    if args.segments is not None and args.segments > n_tokens:
        raise UsageError(f"--segments {args.segments} exceeds the number of tokens ({n_tokens})")


def analyze_image(model, item: ImageInput, args) -> tuple[list[GraphResult], object, dict]:
    """Capture, solve each requested graph, segment; returns (results, resized image, timings)."""
    import torch
    from .evaluation import kmeans_segmentation
    timings = {}
    start = time.perf_counter()
    size = args.image_size
    try:
        captures = model.capture(item.pixels, size=size)
        pixels = model.resize(item.pixels, size)[0]
    except ValueError as exc:  # e.g. an image too small for the model
        raise UsageError(f"{item.stem}: {exc}") from None
    timings["capture"] = time.perf_counter() - start
    grid = _token_grid(captures)
    _check_k(args, grid[0] * grid[1])
    graphs = ("kq", "vv") if args.graph == "both" else (args.graph,)
    results = []
    for graph in graphs:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        if args.solver == "exact":
            vectors, values = solve_exact(captures, graph, args.n_eig, backend=args.backend, seed=args.seed,
                                          progress=args.progress)
        else:
            vectors, values = solve_gd(captures, graph, args.n_eig, steps=args.steps, backend=args.backend,
                                       seed=args.seed, progress=args.progress)
        vectors = vectors.detach().float().cpu().numpy()
        values = values.detach().float().cpu().numpy()
        if not (np.isfinite(vectors).all() and np.isfinite(values).all()):
            raise FloatingPointError(f"{item.stem}: the {graph} eigenvectors are not finite")
        # Ng–Jordan–Weiss: k-means on unit-length rows of components 1..K-1 (0 is the trivial,
        # degree-like one)
        segments = kmeans_segmentation(vectors[..., 1:], args.segments, k_range=SEGMENT_K_RANGE,
                                       row_normalize=True, seed=args.seed)
        timings[graph] = time.perf_counter() - start
        results.append(GraphResult(graph, vectors, values, segments))
    return results, pixels, timings


def write_outputs(out_dir: Path, item: ImageInput, results: list[GraphResult], pixels, args) -> list[Path]:
    """DIR/<stem>.npz plus <stem>_<graph>_{rgb,eigenvectors,segments}.png per graph."""
    from .render import eigenvector_grid, eigenvector_rgb, save_png, segmentation_overlay
    out_dir.mkdir(parents=True, exist_ok=True)
    image = pixels.permute(1, 2, 0).double().numpy()
    size = image.shape[:2]
    arrays = {}
    written = []
    for result in results:
        suffix = "" if result is results[0] else f"_{result.graph}"
        arrays[f"eigenvectors{suffix}"] = result.eigenvectors.astype(np.float32)
        arrays[f"eigenvalues{suffix}"] = result.eigenvalues.astype(np.float32)
        arrays[f"segments{suffix}"] = result.segments.astype(np.int32)
        base = out_dir / f"{item.stem}_{result.graph}"
        written.append(save_png(f"{base}_rgb.png", eigenvector_rgb(result.eigenvectors, size=size)))
        tile = (max(1, size[0] // 2), max(1, size[1] // 2))
        written.append(save_png(f"{base}_eigenvectors.png",
                                eigenvector_grid(result.eigenvectors, n=8, cols=4, tile_size=tile)))
        written.append(save_png(f"{base}_segments.png", segmentation_overlay(image, result.segments)))
    npz = out_dir / f"{item.stem}.npz"
    np.savez(npz, **arrays, graphs=np.array([r.graph for r in results]), model=np.array(args.model),
             solver=np.array(args.solver), image_size=np.array(size, dtype=np.int64))
    return [npz, *written]


def run_analyze(args) -> int:
    device = _torch_device(args.device)
    _check_backend(args.backend, device)
    if args.n_eig < 2:
        raise UsageError(f"--n-eig {args.n_eig}: need K ≥ 2 (component 0 is the trivial one)")
    if args.solver == "exact" and args.steps is not None:
        raise UsageError("--steps applies to --solver gd only")
    args.steps = DEFAULT_GD_STEPS if args.steps is None else args.steps
    inputs = [resolve_image(spec) for spec in (args.images or [DEFAULT_IMAGE])]
    _unique_stems(inputs)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")

    start = time.perf_counter()
    model = _load_model(args.model, device)
    if args.verbose:
        _say(f"model {args.model}: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for item in _progress(inputs, enabled=args.progress and len(inputs) > 1, desc="images", unit="image"):
        start = time.perf_counter()
        results, pixels, timings = analyze_image(model, item, args)
        paths = write_outputs(out_dir, item, results, pixels, args)
        h, w = results[0].eigenvectors.shape[:2]
        parts = [f"{r.graph}: λ₁..₃ = {', '.join(f'{v:.3f}' for v in r.eigenvalues[1:4])}, "
                 f"{len(np.unique(r.segments))} segments" for r in results]
        _say(f"{item.stem}: {h}×{w} tokens, K = {args.n_eig}, {args.solver}; {'; '.join(parts)} → {paths[0]} "
             f"(+{len(paths) - 1} PNG) in {time.perf_counter() - start:.1f} s")
        if args.verbose:
            _say(f"{item.stem}: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in timings.items()), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- dataset
def run_dataset(args) -> int:
    try:
        from .dataset import analyze_dataset
    except ImportError as exc:
        raise UsageError(f"the dataset subcommand is not available in this installation: {exc}") from None
    device = _torch_device(args.device or ("cuda" if _cuda_available() else "cpu"))
    _check_backend(args.backend, device)
    folder = Path(args.folder)
    if not folder.exists():
        raise UsageError(f"dataset folder not found: {args.folder}")
    if not folder.is_dir():
        raise UsageError(f"not a folder: {args.folder}")
    model = _load_model(args.model, device)
    try:
        result = analyze_dataset(str(folder), out_dir=args.out, model=model, n_eig=args.n_eig, steps=args.steps,
                                 batch_images=args.batch_images, mode=args.mode, graph=args.graph,
                                 image_size=args.image_size, layers=args.layers, heads=args.heads, device=device,
                                 seed=args.seed, resume=not args.no_resume, progress=args.progress,
                                 backend=args.backend)
    except ValueError as exc:  # empty folder, settings that contradict a checkpoint, ...
        raise UsageError(str(exc)) from None
    n, h, w, k = result.eigenvectors.shape
    skipped = f", skipped {len(result.skipped)} unreadable" if result.skipped else ""
    print(f"{args.folder}: {n} images, {h}×{w} tokens each, K = {k}, {result.steps} steps{skipped} "
          f"→ {args.out}/<image>.npz")
    return 0


# ---------------------------------------------------------------------------- bench
BENCH_DIM, BENCH_WIDTH = 64, 32  # DESIGN.md §5 workload: d = 64, X of width m = 32


def _time_ms(fn, device, *, budget_s: float, max_reps: int = 20) -> float:
    """Median wall-clock ms of fn() after one warm-up call (CUDA synchronised)."""
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1e3 * statistics.median(times)


def bench_rows(device, sizes, *, backend: str, seed: int, budget_s: float = 1.0):
    """Per N: (N, SDPA ms, row-normalised product ms, symmetric NCut product ms); one run."""
    import torch
    import torch.nn.functional as F
    from .objective import symmetric_offsets
    from .ops import affinity_matmul, affinity_symmetric_matmul
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for n in sizes:
        q = torch.randn(1, 1, n, BENCH_DIM, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, 1, n, BENCH_DIM, device=device, dtype=dtype, generator=gen)
        x = torch.randn(1, 1, n, BENCH_WIDTH, device=device, dtype=dtype, generator=gen)
        scale = BENCH_DIM ** -0.5
        # NCut offsets of S = τ q kᵀ: ½ log of the mean of row and column degrees (computed once)
        offset = symmetric_offsets(q, k, scale=scale, backend=backend)
        # CUDA's fastest SDPA kernels (cuDNN, flash) need V as wide as Q: pad it, as a user would
        v = F.pad(x, (0, BENCH_DIM - BENCH_WIDTH)) if device.type == "cuda" else x
        sdpa = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), device, budget_s=budget_s)
        row = _time_ms(lambda: affinity_matmul(q, k, x, scale=scale, normalize="row", backend=backend), device,
                       budget_s=budget_s)
        sym = _time_ms(lambda: affinity_symmetric_matmul(q, k, x, scale=scale, offset=offset, backend=backend),
                       device, budget_s=budget_s)
        rows.append((n, sdpa, row, sym))
    return rows


def run_bench(args) -> int:
    import torch
    device = _torch_device(args.device)
    _check_backend(args.backend, device)
    sizes = args.sizes or ([4096, 16384, 65536] if device.type == "cuda" else [1024, 2048, 4096])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} threads visible)"
    dtype = "bf16" if device.type == "cuda" else "fp32"
    padded = f" (SDPA's V padded to {BENCH_DIM})" if device.type == "cuda" else ""
    print(f"device: {name}; d = {BENCH_DIM}, m = {BENCH_WIDTH}{padded}, {dtype}, one head, backend {args.backend}; "
          "median ms, ratio = ours / SDPA in this run (< 1: faster than SDPA)")
    print(f"{'N':>8} {'SDPA ms':>10} {'row ms':>10} {'row/SDPA':>9} {'sym ms':>10} {'sym/SDPA':>9}")
    for n, sdpa, row, sym in bench_rows(device, sizes, backend=args.backend, seed=args.seed):
        print(f"{n:>8} {sdpa:>10.3f} {row:>10.3f} {row / sdpa:>9.2f} {sym:>10.3f} {sym / sdpa:>9.2f}", flush=True)
    print("row: softmax(τQKᵀ)·X (affinity_matmul normalize='row'); sym: ½(E+Eᵀ)·X with NCut offsets "
          "(affinity_symmetric_matmul), one call = both directions")
    return 0


# ---------------------------------------------------------------------------- backends
def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_backends(args) -> int:
    import torch
    from .ops import available_backends
    from .ops.backends import triton_interpreted
    from .ops.cuda_backend import _extension
    print(f"available backends: {', '.join(available_backends())}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); triton {_version('triton')}"
          f"{' (interpreter: TRITON_INTERPRET=1)' if triton_interpreted() else ''}")
    print(f"cuda extension spectral_kernels._cuda: {'built' if _extension() is not None else 'not built'}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA device: none (the 'auto' backend is 'torch' on CPU)")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectral-kernels",
        description="Spectral clustering of attention affinities: the 'where' (KQ) and 'what' (VV) "
                    "eigenvectors of a vision transformer's layers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "analyze", help="eigenvectors, renders and segmentations of single images",
        description="Capture a model's attention on each IMAGE and compute the eigenvectors of its "
                    "multi-layer graph. Writes OUT/<stem>.npz with 'eigenvectors' (h, w, K) on the token "
                    "grid, 'eigenvalues' (K,) (exact: of the layer-mean NCut operator; gd: Rayleigh quotients of the "
                    "components under the attention, mean over layers and heads) and 'segments' (h, w); with --graph both these keys hold "
                    "the KQ result and 'eigenvectors_vv', 'eigenvalues_vv', 'segments_vv' the VV one. "
                    "PNGs per graph: <stem>_<graph>_rgb.png (components 1-3 as RGB), "
                    "<stem>_<graph>_eigenvectors.png (components 0-7), <stem>_<graph>_segments.png "
                    "(k-means on the unit-length rows of components 1..K-1).")
    a.add_argument("images", nargs="*", metavar="IMAGE",
                   help=f"image files, or skimage:NAME for a bundled photograph (default: {DEFAULT_IMAGE})")
    a.add_argument("--model", default="dinov2",
                   help="dinov2 (built-in, offline), timm:NAME, hf:HUB_ID or sd:HUB_ID (default: dinov2)")
    a.add_argument("--graph", choices=GRAPHS, default="both",
                   help="kq = attention ('where'), vv = value cosine ('what'), both (default)")
    a.add_argument("--n-eig", type=_positive_int, default=DEFAULT_N_EIG, metavar="K",
                   help=f"eigenvectors per graph, 2 ≤ K < tokens (default {DEFAULT_N_EIG})")
    a.add_argument("--solver", choices=SOLVERS, default="exact",
                   help="exact: block eigensolver on the multi-layer operator (default); "
                        "gd: the paper's gradient descent")
    a.add_argument("--steps", type=_positive_int, default=None, metavar="S",
                   help=f"gradient-descent steps for --solver gd (default {DEFAULT_GD_STEPS}; the paper uses 2000)")
    a.add_argument("--image-size", type=_positive_int, default=DEFAULT_IMAGE_SIZE, metavar="PX",
                   help=f"shorter image side in pixels, rounded to the patch size (default {DEFAULT_IMAGE_SIZE})")
    a.add_argument("--segments", type=_segments, default=None, metavar="K|auto",
                   help="k-means segments, or auto to choose by silhouette (default auto)")
    a.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    _device_options(a)
    a.add_argument("--verbose", action="store_true", help="print the time of each stage to stderr")
    a.set_defaults(run=run_analyze)

    d = sub.add_parser("dataset", help="one embedding for a folder of images (official dataset mode)",
                       description="Per-image eigenvectors trained jointly over a folder of images "
                                   "(spectral_kernels.dataset.analyze_dataset): writes OUT/<stem>.npz per "
                                   "image; checkpoints in OUT/_run, resumed automatically.")
    d.add_argument("folder", metavar="DIR", help="folder of image files")
    d.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    d.add_argument("--model", default="dinov2", help="model name as for analyze (default: dinov2)")
    d.add_argument("--graph", choices=("vv", "kq"), default="vv", help="vv (default, official) or kq")
    d.add_argument("--mode", choices=("knn", "dense"), default="knn",
                   help="knn: sparse kNN graph per batch (official); dense: implicit softmax graph")
    d.add_argument("--n-eig", type=_positive_int, default=20, metavar="K", help="components (default 20)")
    d.add_argument("--steps", type=_positive_int, default=1000, metavar="S", help="outer steps (default 1000)")
    d.add_argument("--batch-images", type=_positive_int, default=40, metavar="B",
                   help="images per batch (default 40)")
    d.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                   help="pixels per side after a centre crop (default: 32 tokens × patch size)")
    d.add_argument("--layers", type=_index_list, default=None, metavar="L,L,...",
                   help="layers to build graphs on: indices or names, e.g. 8,9,10,11 or --layers=-4,-1 "
                        "(negative indices count from the end; default: all)")
    d.add_argument("--heads", type=_head_list, default=None, metavar="H,H,...",
                   help="head indices kept in every selected layer (default: all)")
    d.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    _device_options(d, device_default=None)
    d.set_defaults(run=run_dataset)

    b = sub.add_parser("bench", help="the primitive vs torch SDPA on this device",
                       description="Times the row-normalised product and the symmetric NCut product against "
                                   "torch scaled_dot_product_attention at a few N (d = 64, m = 32), "
                                   "printing ms and the ratio measured in the same run.")
    b.add_argument("--device", choices=DEVICES, default="cuda" if _cuda_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    b.add_argument("--sizes", type=_sizes, default=None, metavar="N,N,...",
                   help="token counts (default 1024,2048,4096 on CPU; 4096,16384,65536 on CUDA)")
    b.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="kernel backend (default auto)")
    b.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    b.set_defaults(run=run_bench)

    k = sub.add_parser("backends", help="available kernel backends and versions")
    k.set_defaults(run=run_backends)
    return parser


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _device_options(p: argparse.ArgumentParser, device_default="cpu") -> None:
    p.add_argument("--device", choices=DEVICES, default=device_default,
                   help="torch device" + (f" (default {device_default})" if device_default else
                                          " (default: cuda when available)"))
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="kernel backend (default auto: the fastest available for the device)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spectral-kernels`` / ``python -m spectral_kernels``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"spectral-kernels {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
