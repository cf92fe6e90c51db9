"""Dataset-level runs: many images, per-image logit tables, batch graphs with inter-image edges.

``analyze_dataset(images, out_dir=...)`` is the one-call entry point (the CLI's ``dataset``
subcommand); ``DatasetRun`` is the same as an object. Modules: ``sources`` (image inputs),
``features`` (capture + disk cache), ``graphs`` (batch objectives, kNN and dense),
``table`` (row-wise AdamW + EMA), ``results`` (joint orthogonalisation, npz files), ``run``.
"""
from .run import MODES, DatasetConfig, DatasetResult, DatasetRun, analyze_dataset

__all__ = ["analyze_dataset", "DatasetRun", "DatasetConfig", "DatasetResult", "MODES"]
