"""Dataset runs: one spectral embedding for many images, trained batch by batch.

    result = analyze_dataset("photos/", out_dir="out/", n_eig=20, steps=2000)

Pipeline (official dataset mode of xiao7199/layer_distributed_spectral_clustering,
``main_cls.py`` / ``model_seg.py`` / ``train_utils.py``):

1. images (a folder or a list) → features of the selected layers, extracted in batches and
   cached in ``out_dir/_run/features`` (``features.py``);
2. per-image logit tables (n_images, K, h0, w0), N(0, 1) initialised (``table.py``);
3. each outer step takes the next batch of ``batch_images`` images of a seeded per-epoch
   shuffle, builds its graph (``graphs.py``: "knn", official, or "dense", implicit) and takes
   ``inner_steps`` AdamW steps on the batch's rows (official ``solver_iters`` = 5), then the
   EMA update (0.99);
4. checkpoints (atomic) every ``checkpoint_every`` steps and/or ``checkpoint_every_s``
   seconds; ``resume=True`` continues from the last one and ends exactly as an
   uninterrupted run would (the schedule is a pure function of seed and step);
5. the EMA tables → softmax → one joint SVD over the dataset → ``out_dir/<name>.npz`` per
   image (``results.py``).

Deliberate differences from the official code: batches never span a partial epoch tail
(official ``drop_last=True`` too, but with a shuffling DataLoader); features are captured once
(the official code re-runs Stable Diffusion with fresh noise per batch); the final SVD is
over column-normalised features of all images (official visualisation: row-normalised).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .._validation import finite_checks
from ..layer_groups import GRAPHS
from .features import FeatureSet, extract_features
from .graphs import DenseBatchGraph, KnnBatchGraph
from .results import joint_orthogonalize, write_image_results
from .sources import collect_images
from .table import LogitTableState

__all__ = ["DatasetConfig", "DatasetResult", "DatasetRun", "analyze_dataset", "MODES"]

MODES = ("knn", "dense")
CHECKPOINT_VERSION = 1
RUN_DIR = "_run"
# settings that may change between a run and its resumption
_RESUMABLE = {"steps", "checkpoint_every", "checkpoint_every_s", "progress", "extract_batch", "backend",
              "image_eigenvalues"}


@dataclass
class DatasetConfig:
    """Every setting of a dataset run (official dataset defaults where it has one)."""
    n_eig: int = 20
    steps: int = 1000
    batch_images: int = 40
    inner_steps: int = 5
    mode: str = "knn"
    graph: str = "vv"
    n_intra: int = 50
    n_inter: int = 50
    threshold: float = 0.1
    temperature: float = 0.1
    layers: list | None = None
    heads: list | None = None
    image_size: int | None = None
    lr: float = 1e-2
    weight_decay: float = 0.0
    ema: float | None = 0.99
    w_eig: float = 1.0
    w_orth: float = 1.0
    seed: int | None = 0
    checkpoint_every: int | None = None
    checkpoint_every_s: float | None = 300.0
    extract_batch: int = 8
    image_eigenvalues: bool = True
    progress: bool = True
    backend: str = "auto"

    def validate(self) -> "DatasetConfig":
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        integer("n_eig", 2)
        integer("steps", 0)
        integer("batch_images", 1)
        integer("inner_steps", 1)
        integer("n_intra", 0)
        integer("n_inter", 0)
        integer("extract_batch", 1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.mode == "knn" and self.n_intra + self.n_inter == 0:
            raise ValueError("n_intra and n_inter are both 0: the kNN graph would have no edges")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("w_eig", "w_orth", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be in (0, 1) or None, got {self.ema!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size must be a positive int (pixels per side) or None, got {self.image_size!r}")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {self.checkpoint_every!r}")
        if self.checkpoint_every_s is not None and not self.checkpoint_every_s > 0:
            raise ValueError(f"checkpoint_every_s must be positive or None, got {self.checkpoint_every_s!r}")
        for name in ("layers", "heads"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))
        return self


@dataclass
class DatasetResult:
    """Output of a dataset run, in dataset order (readable images only).

    eigenvectors: (n_images, h0, w0, K) jointly orthogonalised components (U·S of the whole
        dataset's column-normalised features; component 0 the trivial one).
    features: (n_images, h0, w0, K) softmax features before orthogonalisation.
    singular_values: (K,). eigenvalues: (n_images, K) Rayleigh quotients of each image's
        components on its own (intra-image) graph, mean over layers and heads, or None.
    names / paths: output stems and the written ``.npz`` files; skipped: (name, reason) of
        unreadable images. loss_history: mean inner loss per outer step.
    """
    names: list[str]
    paths: list[str]
    eigenvectors: Tensor
    features: Tensor
    singular_values: Tensor
    eigenvalues: Tensor | None
    loss_history: list[float]
    steps: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 1) % (2 ** 63 - 1)


class DatasetRun:
    """A resumable dataset run; ``DatasetRun(images, out_dir=..., model=..., **settings).run()``.

    ``images``: a folder (its image files, sorted) or a list of paths / tensors / arrays.
    ``model``: a model name for ``load_model`` (default "dinov2") or any object with
    ``capture(images, size=(H, W)) -> list[LayerCapture]``. Settings: the fields of
    ``DatasetConfig``.
    """

    def __init__(self, images, *, out_dir, model="dinov2", device=None, config: DatasetConfig | None = None,
                 **settings):
        config = DatasetConfig(**asdict(config)) if config is not None else DatasetConfig()
        for name, value in settings.items():
            if not hasattr(config, name):
                raise TypeError(f"DatasetRun got an unknown setting {name!r}")
            setattr(config, name, value)
        self.config = config.validate()
        if out_dir is None:
            raise ValueError("out_dir is required: results, features and checkpoints are written there")
        self.out_dir = os.fspath(out_dir)
        self.run_dir = os.path.join(self.out_dir, RUN_DIR)
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.device = torch.device(device) if device is not None else _default_device()
        self.items = collect_images(images)
        self.model = model

    # ------------------------------------------------------------------ features
    def _load_model(self):
        if isinstance(self.model, str):
            from ..models import load_model
            return load_model(self.model, device=self.device)
        return self.model

    def features(self) -> FeatureSet:
        """The readable images' features: from the cache, extracting (and caching) the missing ones."""
        cfg = self.config
        if isinstance(self.model, str):
            model_name = self.model
        elif callable(getattr(self.model, "capture", None)):
            model_name = getattr(self.model, "name", type(self.model).__name__)
        else:
            raise TypeError(f"model must be a model name or an object with a capture() method, "
                            f"got {type(self.model).__name__}")
        self.model_name = model_name
        fs = extract_features(self.items, self._load_model, cache_dir=os.path.join(self.run_dir, "features"),
                              graph=cfg.graph, layers=cfg.layers, heads=cfg.heads, image_size=cfg.image_size,
                              batch_size=cfg.extract_batch, settings={"model": model_name}, progress=cfg.progress)
        for lf in fs.layers:
            for t in (lf.a, lf.b):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"captured features of layer {lf.name!r} contain NaN or Inf values")
        return fs

    def _check_sizes(self, fs: FeatureSet, batch: int) -> None:
        cfg = self.config
        if cfg.mode != "knn":
            return
        smallest = min(lf.grid[0] * lf.grid[1] for lf in fs.layers)
        if cfg.n_intra > smallest - 1:
            raise ValueError(f"n_intra={cfg.n_intra} is larger than the smallest image: its coarsest layer has "
                             f"{smallest} tokens ({smallest - 1} neighbours besides the token itself)")
        if cfg.n_inter > (batch - 1) * smallest:
            raise ValueError(f"n_inter={cfg.n_inter} exceeds the other-image tokens of a batch: {batch} image(s) "
                             f"of {smallest} tokens at the coarsest layer leave {(batch - 1) * smallest}")

    # ------------------------------------------------------------------ schedule
    def batch_index(self, step: int, n_images: int, batch: int) -> Tensor:
        """Images of outer step ``step``: a seeded shuffle per epoch, full batches only."""
        per_epoch = n_images // batch
        epoch, j = divmod(step, per_epoch)
        perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(_epoch_seed(self._seed, epoch)))
        return perm[j * batch:(j + 1) * batch].sort().values

    def _graph(self, fs: FeatureSet, index: Tensor, n_inter=None):
        cfg = self.config
        if cfg.mode == "knn":
            return KnnBatchGraph(fs.layers, index, fs.base_grid, n_intra=cfg.n_intra,
                                 n_inter=cfg.n_inter if n_inter is None else n_inter,
                                 threshold=cfg.threshold, device=self.device)
        return DenseBatchGraph(fs.layers, index, fs.base_grid, graph=cfg.graph, temperature=cfg.temperature,
                               device=self.device, backend=cfg.backend)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, step, history, table, keys) -> dict:
        return {"version": CHECKPOINT_VERSION, "config": asdict(self.config), "seed": self._seed, "step": step,
                "model": self.model_name, "image_keys": keys, "table": table.state_dict(), "history": list(history)}

    def _restore(self, state, table, keys):
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {self.checkpoint_path} has version {state.get('version')}, "
                             f"expected {CHECKPOINT_VERSION}")
        saved, now = state["config"], asdict(self.config)
        diff = {k: (saved.get(k), v) for k, v in now.items()
                if k not in _RESUMABLE and not (k == "seed" and v is None) and saved.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {self.checkpoint_path} was written with other settings: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                             + " (use another out_dir or resume=False)")
        if state.get("model") != self.model_name:
            raise ValueError(f"checkpoint {self.checkpoint_path} was trained on model {state.get('model')!r}, "
                             f"not {self.model_name!r} (use another out_dir or resume=False)")
        if state["image_keys"] != keys:
            raise ValueError(f"checkpoint {self.checkpoint_path} belongs to another set of images "
                             f"({len(state['image_keys'])} saved, {len(keys)} now)")
        table.load_state_dict(state["table"])
        return int(state["step"]), list(state["history"])

    # ------------------------------------------------------------------ run
    def run(self, *, resume: bool = True, callback=None) -> DatasetResult:
        """Extract (or reuse) features, train, write ``out_dir/<name>.npz`` per image.

        ``resume``: continue from ``out_dir/_run/checkpoint.pt`` when it exists (else start
        fresh, overwriting it). ``callback(step, loss)`` is called after every outer step.
        """
        cfg = self.config
        fs = self.features()
        n = fs.n_images
        batch = min(cfg.batch_images, n)
        self._check_sizes(fs, batch)
        keys = [item.key for item in fs.items]
        state = ckpt.load(self.checkpoint_path, device=self.device) \
            if resume and os.path.exists(self.checkpoint_path) else None
        self._seed = cfg.seed if cfg.seed is not None else \
            (state["seed"] if state is not None else int.from_bytes(os.urandom(7), "little"))
        h0, w0 = fs.base_grid
        init = torch.randn(n, cfg.n_eig, h0, w0, generator=torch.Generator().manual_seed(self._seed))
        table = LogitTableState(init.to(self.device), lr=cfg.lr, weight_decay=cfg.weight_decay, ema=cfg.ema)
        start, history = (0, []) if state is None else self._restore(state, table, keys)
        if state is None or start < cfg.steps:
            history = self._train(fs, table, start, history, batch, keys, callback)
        return self._finish(fs, table, history)

    def _train(self, fs, table, start, history, batch, keys, callback):
        cfg = self.config
        last_save = time.monotonic()
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
                   desc="dataset run", dynamic_ncols=True)
        with finite_checks(False):  # inputs were scanned once in features(); the loss is checked below
            for step in bar:
                index = self.batch_index(step, fs.n_images, batch)
                graph = self._graph(fs, index)
                dev_index = index.to(self.device)
                table.ema_sync(dev_index, step)
                total = 0.0
                for _ in range(cfg.inner_steps):
                    logits = table.rows(dev_index)
                    rows = logits.softmax(dim=1).flatten(2).transpose(1, 2)      # (B, h0·w0, K)
                    loss = graph.loss(rows, w_eig=cfg.w_eig, w_orth=cfg.w_orth)
                    loss.backward()
                    table.adam_step(dev_index, logits.grad)
                    total += float(loss.detach())
                table.ema_update(dev_index, step)
                value = total / cfg.inner_steps
                if not math.isfinite(value):
                    raise FloatingPointError(f"the loss became {value} at step {step + 1}")
                history.append(value)
                done = step + 1
                bar.set_postfix(loss=f"{value:.5f}")
                due = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or \
                      (cfg.checkpoint_every_s and time.monotonic() - last_save >= cfg.checkpoint_every_s)
                if due or done == cfg.steps:
                    ckpt.save_atomic(self._state(done, history, table, keys), self.checkpoint_path)
                    last_save = time.monotonic()
                if callback is not None:
                    callback(done, value)
        bar.close()
        if cfg.steps == 0 or start >= cfg.steps:
            ckpt.save_atomic(self._state(max(start, cfg.steps), history, table, keys), self.checkpoint_path)
        return history

    @torch.no_grad()
    def _finish(self, fs, table, history) -> DatasetResult:
        cfg = self.config
        h0, w0 = fs.base_grid
        logits = table.final(len(history)).to(torch.float32)
        rows = logits.softmax(dim=1).flatten(2).transpose(1, 2)                  # (n, h0·w0, K)
        vectors, singular = joint_orthogonalize(rows)
        eigenvalues = self._image_eigenvalues(fs, vectors) if cfg.image_eigenvalues else None
        shape = (fs.n_images, h0, w0, cfg.n_eig)
        vectors, rows = vectors.reshape(shape).cpu(), rows.reshape(shape).cpu()
        names = [item.name for item in fs.items]
        paths = write_image_results(self.out_dir, names, vectors, rows, singular, eigenvalues)
        return DatasetResult(names, paths, vectors, rows, singular.cpu(), eigenvalues, list(history), len(history),
                             [(item.name, reason) for item, reason in fs.skipped])

    def _image_eigenvalues(self, fs, vectors) -> Tensor:
        """Per image and component: z_kᵀ A z_k on the image's own graph, mean over layers and heads."""
        out = torch.empty(fs.n_images, vectors.shape[-1])
        with finite_checks(False):
            for i in range(fs.n_images):
                index = torch.tensor([i])
                graph = self._graph(fs, index, n_inter=0)
                zs = graph.layer_z(vectors[i:i + 1].to(self.device))
                quotients = torch.cat(graph.quotients(zs))                       # (Σ heads, K)
                out[i] = quotients.mean(0).cpu()
        return out


def analyze_dataset(images, *, out_dir, model="dinov2", n_eig: int = 20, steps: int = 1000,
                    batch_images: int = 40, inner_steps: int = 5, mode: str = "knn", graph: str = "vv",
                    n_intra: int = 50, n_inter: int = 50, threshold: float = 0.1, temperature: float = 0.1,
                    layers=None, heads=None, image_size: int | None = None, lr: float = 1e-2, ema: float | None = 0.99,
                    checkpoint_every: int | None = None, checkpoint_every_s: float | None = 300.0,
                    resume: bool = True, device=None, seed: int | None = 0, extract_batch: int = 8,
                    image_eigenvalues: bool = True, progress: bool = True, backend: str = "auto") -> DatasetResult:
    """Spectral embedding of a whole dataset (official dataset mode); writes ``out_dir/<name>.npz``.

    Args:
        images: a folder (image files with common extensions, sorted by name) or a list of
            paths / (3, H, W) tensors / arrays / PIL images. Unreadable files are skipped with
            one warning listing them; an empty dataset raises ValueError.
        out_dir: output folder: one ``<image stem>.npz`` per image (``eigenvectors`` (h, w, K),
            ``features``, ``singular_values``, ``eigenvalues``); ``out_dir/_run`` holds the
            feature cache and the checkpoint.
        model: a ``load_model`` name (default "dinov2") or an object with ``capture``.
        n_eig: K, the number of components. steps: outer steps (batches);
            inner_steps: optimiser steps per batch (official ``solver_iters`` 5).
        batch_images: images per batch (official 40; capped at the dataset size).
        mode: "knn" (official: sparse kNN graph of the batch's tokens, random-walk normalised)
            or "dense" (implicit softmax graph of all the batch's tokens via affinity_matmul).
        graph: "vv" (value cosine, official dataset default) or "kq" (query-key).
        n_intra, n_inter, threshold: kNN neighbours in the same / other images and the cosine
            cut (official 50, 50, 0.1). temperature: τ = 1/temperature of dense VV graphs.
        layers: captured layer names or indices to use (None: all); heads: head indices kept
            in every layer (None: all). Only these are cached and used. image_size: pixels per
            side after a centre crop (None: 32 tokens × the model's patch size).
        lr, ema: AdamW learning rate (official 1e-2) and EMA decay (0.99; None disables).
        checkpoint_every / checkpoint_every_s: checkpoint every n steps and/or seconds.
        resume: continue from the checkpoint in ``out_dir`` if there is one.
        device: torch device (default: CUDA if available). seed: int (None: random, saved).
        image_eigenvalues: also compute per-image Rayleigh quotients (one small graph per image).

    Returns:
        DatasetResult (see its docstring).
    """
    return DatasetRun(images, out_dir=out_dir, model=model, device=device, n_eig=n_eig, steps=steps,
                      batch_images=batch_images, inner_steps=inner_steps, mode=mode, graph=graph, n_intra=n_intra,
                      n_inter=n_inter, threshold=threshold, temperature=temperature, layers=layers, heads=heads,
                      image_size=image_size, lr=lr, ema=ema, checkpoint_every=checkpoint_every,
                      checkpoint_every_s=checkpoint_every_s, seed=seed, extract_batch=extract_batch,
                      image_eigenvalues=image_eigenvalues, progress=progress, backend=backend).run(resume=resume)
