"""Compile the Triton kernels for sm_90 without a GPU (ptxas ships with Triton).

Imported by the scripts that tests run in a subprocess without TRITON_INTERPRET (the
interpreter never compiles), so GPU-only compile errors and resource use show on CPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Element type of each pointer argument; q/k/X/W default to bf16 (``operands`` overrides).
POINTERS = {"Q": "bf16", "K": "bf16", "X": "bf16", "WQ": "bf16", "YT": "fp32", "ROW_OFFSET": "fp32",
            "COL_OFFSET": "fp32", "OFFSET": "fp32", "HEAD_WEIGHTS": "fp32", "Y": "fp32", "LSE": "fp32"}
UNIT_STRIDES = {"sq_d": 1, "sk_d": 1, "sx_w": 1, "sw_w": 1, "sy_w": 1, "st_w": 1}  # what Triton specialises at launch


def compile_hopper(fn, constexprs, num_warps, num_stages, *, aligned=False, operands="bf16", arch=90):
    """The compiled kernel (``.asm["ptx"]``, ``.metadata.shared``) of ``fn`` for sm_90 (or ``arch``).

    aligned: as a launch on 16-byte aligned tensors with sizes and strides divisible by 16
    specialises the kernel (what lets the column atomics be 16-byte vectors). operands:
    the element type of q, k, X and W.
    """
    pointers = {**POINTERS, **{name: operands for name in ("Q", "K", "X", "WQ")}}
    constexprs = {**constexprs, **{k: v for k, v in UNIT_STRIDES.items() if k in fn.arg_names}}
    signature = {name: "constexpr" if name in constexprs else
                 "*" + pointers[name] if name in pointers else
                 "fp32" if name == "scale_log2" else "i32" for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if aligned and signature[name] not in ("constexpr", "fp32")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def hopper_ptx(fn, constexprs, num_warps, num_stages, **options):
    """PTX of ``fn`` for sm_90, checked to use the Hopper tensor cores (not mma.sync)."""
    ptx = compile_hopper(fn, constexprs, num_warps, num_stages, **options).asm["ptx"]
    assert "wgmma.mma_async" in ptx, fn.__name__
    return ptx


def has_column_atomics(ptx, vector=""):
    """Triton 3.9 writes the unused-result float add as red.global, 3.6 (the GPU image) as
    atom.global; ptxas turns both into the same REDG instruction. vector: ".v4" for the
    16-byte form (a quarter of the atomic instructions)."""
    return re.search(r"\b(?:red|atom)\.global(?:\.[a-z]+)*\.add" + re.escape(vector) + r"\.f32\b", ptx) is not None


def run_script(script, timeout=600):
    """Run ``script`` in a fresh Python without TRITON_INTERPRET (so Triton compiles) and
    with this folder importable; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
