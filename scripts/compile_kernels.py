"""Compile every ShadowKV Triton kernel for an NVIDIA architecture, with no GPU needed.

    python scripts/compile_kernels.py            # sm_90 (H100/H200), all variants
    python scripts/compile_kernels.py --quick    # bf16 d=128 and fp32 d=64 only
    python scripts/compile_kernels.py --inductor-kernels k.json   # kernels Inductor generated

The interpreter (TRITON_INTERPRET=1, the CPU tests) checks numerics but not whether a kernel
compiles for a GPU: shapes, layouts, tl.dot operand types, shared memory. This script runs the
real launch wrappers at the Llama-3.1-8B layer shape with the launches recorded instead of
executed, compiles each recorded kernel ahead of time (Triton -> PTX -> cubin with the ptxas
that ships with Triton) and prints registers, spills (local memory) and shared memory per
kernel. Exit status 1 if any kernel fails to compile.

``--inductor-kernels FILE`` compiles instead the kernels of a JSON file {label: source}: Triton
modules that Inductor generated from our templates (tests/test_lowering.py writes one from a CPU
compile under the interpreter); their ``UPCAST`` constexpr is set to False, as on a GPU.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import ClassVar

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import torch
import triton
from shadowpass.templates import (
    chunk_gather,
    chunk_landmarks,
    landmark_scores,
    sparse_decode,
)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile
from triton.runtime.jit import mangle_type

MODULES = (chunk_gather, chunk_landmarks, landmark_scores, sparse_decode)


class Recorder:
    """Stands in for ``launch(kernel)[grid](*args, **kwargs)``: records, runs nothing."""

    calls: ClassVar[list] = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            Recorder.calls.append((self.kernel, grid, args, kwargs))
        return record


def record_launches(dtype: torch.dtype, d: int):
    """Run each wrapper once at the Llama-3.1-8B layer shape (1 sequence, 32K context)."""
    B, H, G, N, C, r, K, O, L, gcap = 1, 8, 4, 4096, 8, 160, 256, 48, 32, 256
    z = torch.zeros
    q = z(B, H * G, 1, d, dtype=dtype)
    lm = z(B, H, N, d, dtype=dtype)
    sel = torch.ones(B, H, N, dtype=torch.bool)
    landmark_scores.landmark_scores(q, lm, sel, 0.1)
    idx = torch.arange(K).expand(B, H, K).contiguous()
    chunk_gather.reuse_plan(idx, z(B, H, K, dtype=torch.int32), z(B, H, N, dtype=torch.int16))
    cached = chunk_gather.reuse_plan(idx, z(B, H, 4 * K, dtype=torch.int32),  # a value cache
                                     z(B, H, N, dtype=torch.int16), z(B, H, N))
    plan = chunk_gather.full_load(idx)
    U, SV = z(B, N * C, r, dtype=dtype), z(B, H, r, d, dtype=dtype)
    cos = z(1, N * C, d // 2, dtype=dtype)  # one value per rotated pair (reference.rope_tables)
    sel_k = z(B, H, K * C, d, dtype=dtype)
    for style in ("rotate_half", "interleaved", "none"):
        chunk_gather.rebuild_keys_into(sel_k, U, SV, cos, cos, *plan, C, style)
    chunk_gather.fetch_values_into(sel_k, z(B, H, N, C, d, dtype=dtype), *plan)
    kv = z(B, H, O * C, d, dtype=dtype)
    loc = z(B, H, L, d, dtype=dtype)
    gen = z(B, H, gcap, d, dtype=dtype)
    sparse_decode.sparse_decode(
        q, 0.1, kv, kv, torch.ones(B, H, O * C, dtype=torch.bool), sel_k, sel_k,
        plan[0], torch.ones(B, N * C, dtype=torch.bool), sel, loc, loc,
        torch.ones(B, L, dtype=torch.bool), gen, gen, torch.tensor([5]), chunk_size=C,
        num_splits=8)
    cache_k = z(B, H, 4 * K * C, d, dtype=dtype)
    sparse_decode.sparse_decode(
        q, 0.1, kv, kv, torch.ones(B, H, O * C, dtype=torch.bool), cache_k, cache_k,
        z(B, H, 4 * K, dtype=torch.int32), torch.ones(B, N * C, dtype=torch.bool), sel, loc, loc,
        torch.ones(B, L, dtype=torch.bool), gen, gen, torch.tensor([5]), chunk_size=C,
        num_splits=8, sel_slot=cached[3])
    chunk_landmarks.chunk_landmarks(z(B, H, N * C, d, dtype=dtype),
                                    torch.ones(B, N * C, dtype=torch.bool), C)


def resources(cubin: bytes) -> dict:
    """REG / LOCAL (spills) / SHARED from cuobjdump -res-usage, if Triton ships cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|STACK):(\d+)", out)}


def load_inductor_kernel(source: str):
    """(JITFunction, signature, num_warps, num_stages) of an Inductor-generated template kernel,
    its launch decorator dropped and UPCAST off (the interpreter-only operand widening)."""
    name = re.search(r"def (triton_\w+)\(", source).group(1)
    sig = ast.literal_eval(re.search(r"'signature': (\{.*?\})", source).group(1))
    warps = int(re.search(r"num_warps=(\d+)", source).group(1))
    stages = int(re.search(r"num_stages=(\d+)", source).group(1))
    body = re.sub(r"@triton_heuristics\.template\(.*?\)\n@triton\.jit", "@triton.jit", source,
                  flags=re.S)
    body = body.replace("triton_helpers.set_driver_to_cpu()", "")
    body = body.replace("UPCAST : tl.constexpr = True", "UPCAST : tl.constexpr = False")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(body)
    spec = importlib.util.spec_from_file_location(name, f.name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.unlink(f.name)
    return getattr(mod, name), sig, warps, stages


def divisibility(args) -> dict:
    """The attrs a GPU launch would give these arguments: 16-byte aligned pointers and integers
    divisible by 16 are marked so (Triton specializes on both), which decides whether loads
    vectorize and pipeline through shared memory (cp.async); without them the report is of a
    scalar-load kernel no launch compiles."""
    def aligned(a):
        if isinstance(a, torch.Tensor):
            return a.data_ptr() % 16 == 0
        return isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args) if aligned(a)}


def compile_for(src, target, options):
    """Compile one kernel for the target: (registers, spilled bytes, shared memory bytes)."""
    k = triton_compile(src, target=target, options=options)
    res = resources(k.asm["cubin"])
    return res.get("REG", "?"), res.get("LOCAL", 0) + res.get("STACK", 0), k.metadata.shared


def compile_inductor_kernels(path: str, target) -> int:
    """Compile each kernel of the JSON file; prints a table, returns the failure count."""
    failures = 0
    print(f"{'kernel':<96} {'warps':>5} {'regs':>5} {'spill B':>8} {'shared B':>9}")
    with open(path) as f:
        kernels = json.load(f)
    for label, source in kernels.items():
        try:
            fn, sig, warps, stages = load_inductor_kernel(source)
            # Inductor's own buffers and our inputs are 16-byte aligned on a GPU
            aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values())
                       if t.startswith("*")}
            regs, spill, shared = compile_for(ASTSource(fn=fn, signature=sig, constexprs={},
                                                        attrs=aligned),
                                              target, {"num_warps": warps, "num_stages": stages})
        except Exception as e:  # noqa: BLE001 (report every failing kernel, then fail)
            failures += 1
            print(f"{label:<96} FAILED: {type(e).__name__}: {e}")
            continue
        print(f"{label:<96} {warps:>5} {regs:>5} {spill:>8} {shared:>9}")
    print(f"{failures} failed to compile")
    return failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    p.add_argument("--quick", action="store_true", help="bf16 d=128 and fp32 d=64 only")
    p.add_argument("--inductor-kernels", metavar="FILE",
                   help="compile the Inductor-generated kernels of this JSON file instead")
    args = p.parse_args()
    if args.inductor_kernels:
        print(f"triton {triton.__version__}, target sm_{args.arch}")
        failures = compile_inductor_kernels(args.inductor_kernels, GPUTarget("cuda", args.arch, 32))
        sys.exit(1 if failures else 0)
    variants = ([(torch.bfloat16, 128), (torch.float32, 64)] if args.quick else
                [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128),
                 (torch.float32, 128), (torch.float32, 64)])
    for mod in MODULES:
        mod.launch = Recorder  # the wrappers look launch up in their own module
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'kernel':<32} {'dtype':<9} {'d':>4} {'warps':>5} {'regs':>5} {'spill B':>8} "
          f"{'shared B':>9}")
    failures, spills = 0, 0
    for dtype, d in variants:
        Recorder.calls = []
        record_launches(dtype, d)
        seen = set()
        for kernel, _grid, call_args, kwargs in Recorder.calls:
            kwargs = dict(kwargs)
            num_warps = kwargs.pop("num_warps", 4)
            options = {"num_warps": num_warps, "num_stages": kwargs.pop("num_stages", 3)}
            free = [n for n in kernel.arg_names if n not in kwargs]
            sig = {n: mangle_type(a) for n, a in zip(free, call_args)}
            sig.update({n: "constexpr" for n in kwargs})
            key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            name = kernel.__name__ + ("" if "ROPE" not in kwargs else f"[rope={kwargs['ROPE']}]")
            try:
                regs, spill, shared = compile_for(
                    ASTSource(fn=kernel, signature=sig, constexprs=kwargs,
                              attrs=divisibility(call_args)), target, options)
            except Exception as e:  # noqa: BLE001 (report every failing kernel, then fail)
                failures += 1
                print(f"{name:<32} {str(dtype)[6:]:<9} {d:>4}  FAILED: {type(e).__name__}: {e}")
                continue
            spills += spill > 0
            print(f"{name:<32} {str(dtype)[6:]:<9} {d:>4} {num_warps:>5} {regs:>5} "
                  f"{spill:>8} {shared:>9}")
    print(f"{failures} failed to compile; {spills} spill registers to local memory")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
