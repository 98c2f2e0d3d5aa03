"""Ahead-of-time compile report of lrtrain's Triton kernels for a GPU architecture, without a GPU.

Triton compiles for any NVIDIA target on a CPU machine (its backend ships ``ptxas`` and ``cuobjdump``).
For each variant the dispatcher can launch (kernel, products' precision, residual rule, side, autotuner
tile) this reports the registers and spill bytes from ``ptxas -v`` and whether the SASS multiplies on
tensor cores (HGMMA / HMMA instructions)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from . import subspace_adam as kernels

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TYPES = {"bf16": "*bf16", "fp16": "*fp16"}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its constexprs, pointer types and tile."""

    kernel: str
    precision: str
    side: str
    residual: str  # project_adam: its outputs ("-": N; "low": N and R; "low+norms": also G's norms)
    tile: str
    grouped: bool  # the launch over a bucket's other matrices, reading their offsets from a table
    default: bool  # launched by the fused path for bf16 weights (with torch's default float32 precision)


@dataclass(frozen=True)
class Report:
    kernel: str
    variant: str
    arch: str
    regs: int
    spill_bytes: int
    tensor_core: bool
    default: bool


def _tile_name(config: triton.Config) -> str:
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}/w{config.num_warps}s{config.num_stages}"


#: The strides that are 1 on each side for contiguous tensors (Triton specializes an int argument equal to
#: 1 into a constant at launch, so the compiled code is the one with these as constants).
UNIT_STRIDES = {
    ("project_adam", "right"): ("stride_ak", "stride_bk", "stride_cn"),
    ("project_adam", "left"): ("stride_am", "stride_bn", "stride_cn"),
    ("project_back_update", "right"): ("stride_wn", "stride_ak", "stride_bn", "stride_a2k", "stride_b2n", "stride_gn"),
    ("project_back_update", "left"): ("stride_wn", "stride_ak", "stride_bn", "stride_a2k", "stride_b2n", "stride_gn"),
}


def _signature(fn, pointer_types: dict[str, str], constexprs: dict) -> tuple[dict[str, str], dict]:
    """Triton's signature and the 16-byte alignment torch gives every pointer."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "offsets_ptr" else pointer_types.get(name, "*fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("M", "N", "K", "count") or name.startswith("stride"):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    return signature, attrs


def variants() -> Iterator[tuple[Variant, object, dict[str, str], dict, triton.Config]]:
    """(variant, kernel's name in :mod:`~lrtrain.kernels.subspace_adam`, pointer types, constexprs, tile) for
    every form the fused path can launch."""
    for precision in kernels.PRECISIONS:
        operand = _TYPES.get(precision, "*fp32")  # the weights' and gradient's type for this precision
        default = precision == "bf16"
        for side in ("right", "left"):
            # project_adam: G·Qᵀ (a = G, b = Qᵀ) on the right, Pᵀ·G (a = Pᵀ, b = G) on the left; moments stored
            # in the weights' type
            types = {"a_ptr": operand, "b_ptr": operand, "exp_avg_ptr": operand, "exp_avg_sq_ptr": operand}
            # what the rules ask for: N (GaLore), N and R (FRUGAL), N, R and G's norms (Fira)
            outputs = {"-": (False, 0), "low": (True, 0), "low+norms": (True, 1 if side == "right" else 2)}
            for (label, (store_low, norms)), grouped, tile in itertools.product(
                    outputs.items(), (True, False), kernels.tiles("project_adam", precision)):
                constexprs = {"STORE_LOW": store_low, "NORMS": norms, "PRECISION": precision, "INTERPRETED": False,
                              "GROUPED": grouped}
                yield (Variant("project_adam", precision, side, label, _tile_name(tile), grouped, default),
                       "_project_adam_kernel", types, constexprs, tile)
            # project_back_update_: D·Q (a = D float32, b = Q) on the right, P·D (a = P, b = D) on the left
            right = side == "right"
            types = {"w_ptr": operand, "g_ptr": operand, "a_ptr": "*fp32" if right else operand,
                     "b_ptr": operand if right else "*fp32", "a2_ptr": "*fp32" if right else operand,
                     "b2_ptr": operand if right else "*fp32"}
            for (residual, code), grouped in itertools.product(kernels.RESIDUAL_CODES.items(), (True, False)):
                for tile in kernels.tiles("project_back_update", precision, residual):
                    constexprs = {"RESIDUAL": code, "COEF_ON_ROWS": right, "PRECISION": precision,
                                  "INTERPRETED": False, "GROUPED": grouped}
                    yield (Variant("project_back_update", precision, side, residual, _tile_name(tile), grouped,
                                   default), "_project_back_update_kernel", types, constexprs, tile)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store + load bytes) that ``ptxas -v`` reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    text = done.stderr + done.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def _uses_tensor_cores(cubin: bytes) -> bool:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return bool(re.search(r"\b(HGMMA|HMMA)\b", sass))


def compile_variant(variant: Variant, kernel, pointer_types: dict, constexprs: dict, tile: triton.Config,
                    arch: int = 90) -> Report:
    """Compile one variant for ``sm_<arch>`` and read its resource use."""
    constexprs = {**constexprs, **tile.kwargs, **dict.fromkeys(UNIT_STRIDES[variant.kernel, variant.side], 1)}
    signature, attrs = _signature(kernel, pointer_types, constexprs)
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    name = "/".join((variant.precision, variant.side, variant.residual, variant.tile)
                    + (("grouped",) if variant.grouped else ()))
    return Report(variant.kernel, name, f"sm_{arch}", regs, spills, _uses_tensor_cores(compiled.asm["cubin"]),
                  variant.default)


def compile_report(arch: int = 90, only_default: bool = False, first_tile: bool = False) -> list[dict]:
    """Every variant's report as a dict (``only_default``: the bf16 variants only; ``first_tile``: one form
    per variant, a quick check: the grouped launch, a superset of the single one's code, at the first tile)."""
    chosen, seen = [], set()
    for variant, *rest in variants():
        key = (variant.kernel, variant.precision, variant.side, variant.residual)
        if (only_default and not variant.default) or (first_tile and key in seen):
            continue
        seen.add(key)
        chosen.append((variant, *rest))
    # one compile per process (Triton's compiler and ptxas are single-threaded)
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        return [asdict(report) for report in pool.map(_compile_one, [(c, arch) for c in chosen])]


def _compile_one(job: tuple) -> Report:
    (variant, kernel_name, pointer_types, constexprs, tile), arch = job
    return compile_variant(variant, getattr(kernels, kernel_name), pointer_types, constexprs, tile, arch=arch)
