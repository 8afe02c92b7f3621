"""shadowkv::sparse_attention: the op, its Inductor lowering (Triton templates) and the split
decode route that uses it (its other ops: tests/test_split_step.py).

CPU (CI): the op's reference against the flash-decoding kernels under the Triton interpreter;
fake/opcheck; the lowering registered on import; and the whole template route compiled by
Inductor for the CPU with ``cpu_backend="triton"``, run by the interpreter (Triton on this
machine has no driver, so a stub that names an sm_90 target stands in while Inductor generates
code; nothing is compiled for it). GPU (``-m gpu``): the same on CUDA at real sizes, with
``torch._inductor.utils.run_and_get_code`` checks on the generated code:

    pytest -m gpu tests/test_lowering.py
"""
import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the kernels need Triton (pip install triton numpy)")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

from torch._inductor import config as inductor_config  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402
from tolerances import KERNEL_BF16, KERNEL_FP16, KERNEL_FP32  # noqa: E402

import shadowpass  # noqa: E402,F401  (registers the ops and their lowerings)
from shadowpass import lowering, ops  # noqa: E402
from shadowpass import reference as ref  # noqa: E402
from shadowpass.lowering import compat  # noqa: E402
from shadowpass.templates import chunk_gather  # noqa: E402
from shadowpass.templates import landmark_scores as scores_tmpl  # noqa: E402
from shadowpass.templates import sparse_attention as tmpl  # noqa: E402
from shadowpass.templates.common import INTERPRET  # noqa: E402
from shadowpass.templates.sparse_decode import sparse_decode  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: KERNEL_FP32, torch.float16: KERNEL_FP16, torch.bfloat16: KERNEL_BF16}
OP = torch.ops.shadowkv.sparse_attention.default


def close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def segments(B=2, H=2, G=2, T=1, d=64, N=12, C=8, K=4, O=2, Ll=13, Gcap=9, gen_len=5,
             dtype=torch.float32, device=DEV, empty_slot=True, seed=0):
    """sparse_attention's arguments with the invariants the decode step guarantees: padding is
    a prefix of sequence 0, slots hold distinct chunks (one slot empty), gen_len >= T."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    Lo = O * C
    outlier_valid = torch.ones(B, H, Lo, dtype=torch.bool)
    if Lo:
        outlier_valid[0, :, :3] = False
    slot_chunk = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * H)])
    slot_chunk = slot_chunk.view(B, H, K).to(torch.int32)
    if empty_slot and K:
        slot_chunk[B - 1, H - 1, K - 1] = -1
    sparse_valid = torch.ones(B, N * C, dtype=torch.bool)
    sparse_valid[0, :11] = False
    selectable = torch.rand(B, H, N, generator=g) > 0.2
    local_valid = torch.ones(B, Ll, dtype=torch.bool)
    q = rnd(B, H * G, T, d)
    return (q, d ** -0.5, rnd(B, H, Lo, d), rnd(B, H, Lo, d), outlier_valid.to(device),
            rnd(B, H, K * C, d), rnd(B, H, K * C, d), slot_chunk.to(device),
            sparse_valid.to(device), selectable.to(device), rnd(B, H, Ll, d), rnd(B, H, Ll, d),
            local_valid.to(device), rnd(B, H, Gcap, d), rnd(B, H, Gcap, d),
            torch.tensor([gen_len], device=device), C)


def direct(args):
    """The attention written out over the concatenated segments, in fp64 (the golden)."""
    (q, scale, ok, ov, ovalid, sk, sv, slot, tokv, selectable, lk, lv, lvalid, gk, gv, gl,
     C) = args
    B, Hq, T, d = q.shape
    H = ok.shape[1]
    chunk = slot.long()
    tok = (chunk.clamp(min=0)[..., None] * C + torch.arange(C, device=q.device)).flatten(2)
    sel_ok = (tokv[:, None].expand(B, H, -1).gather(2, tok)
              & selectable.gather(2, chunk.clamp(min=0)).repeat_interleave(C, -1)
              & (chunk >= 0).repeat_interleave(C, -1))
    Lg = int(gl.item())
    keys = torch.cat([ok, sk, lk, gk[:, :, :Lg]], 2).double()
    vals = torch.cat([ov, sv, lv, gv[:, :, :Lg]], 2).double()
    valid = torch.cat([ovalid, sel_ok, lvalid[:, None].expand(B, H, -1)], 2)
    valid = valid[:, :, None].expand(B, H, T, -1)
    causal = torch.arange(Lg, device=q.device)[None] <= (Lg - T + torch.arange(T, device=q.device))[:, None]
    valid = torch.cat([valid, causal[None, None].expand(B, H, T, Lg)], 3)
    s = torch.einsum("bhgtd,bhsd->bhgts", q.double().view(B, H, Hq // H, T, d), keys) * scale
    s = s.masked_fill(~valid[:, :, None], -math.inf)
    return torch.einsum("bhgts,bhsd->bhgtd", s.softmax(-1), vals).reshape(B, Hq, T, -1)


CASES = [  # G, T, d, dtype, segment sizes
    pytest.param(1, 1, 64, torch.float32, {}, id="mha-fp32"),
    pytest.param(4, 1, 128, torch.bfloat16, {}, id="gqa4-bf16-d128"),
    pytest.param(2, 3, 64, torch.float16, {}, id="gqa2-T3-fp16"),
    pytest.param(2, 1, 64, torch.float32, {"O": 0, "Ll": 0}, id="no-outliers-no-local"),
    pytest.param(2, 1, 64, torch.float32, {"K": 0}, id="no-selected-chunks"),
]


# ----------------------------------------------------------------------------- the op
@pytest.mark.parametrize("G,T,d,dtype,sizes", CASES)
def test_reference_matches_direct_attention(G, T, d, dtype, sizes):
    args = segments(G=G, T=T, d=d, dtype=dtype, device="cpu", **sizes)
    got = ref.sparse_attention(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    close(got, direct(args), dtype)


@pytest.mark.parametrize("G,T,d,dtype,sizes", CASES)
def test_reference_matches_flash_decoding_kernels(G, T, d, dtype, sizes):
    """The op's reference against the existing Triton kernels (sparse_decode), whose argument
    layout it shares."""
    args = segments(G=G, T=T, d=d, dtype=dtype, **sizes)
    want = ops.sparse_attention(*args)  # the reference on CPU; sparse_decode on CUDA
    got = sparse_decode(*args[:-1], chunk_size=args[-1], num_splits=3)
    close(got, want, dtype)


def test_a_row_with_no_valid_key_is_nan_everywhere():
    args = list(segments(O=0, Ll=0, K=1, gen_len=1, T=1))
    args[7][:] = -1  # every slot empty
    args[15][:] = 0  # gen_len 0 with T = 1: the query sees no generated token either
    assert ref.sparse_attention(*args).isnan().all()
    assert sparse_decode(*args[:-1], chunk_size=args[-1]).isnan().all()


def test_opcheck_sparse_attention():
    args = segments(dtype=torch.float32, device="cpu")
    torch.library.opcheck(ops.sparse_attention, args)


def test_fake_checks_shapes():
    args = list(segments(device="meta"))
    args[5], args[6] = args[5][:, :, :-1], args[6][:, :, :-1]  # one row short of K*C
    with pytest.raises(RuntimeError, match="sel_k"):
        OP(*args)


def test_decode_gather_then_attention_equals_decode_step():
    """decode = decode_gather + sparse_attention over the workspace (the split route), with
    the reference gather (CPU) and with the CUDA kernels' gather_step."""
    from test_kernels import split, synthetic_state
    B, H, G, N, C, d, r, budget = 2, 2, 2, 12, 8, 64, 16, 5
    st = synthetic_state(B, H, N, C, d, r, d, 2, 13, "rotate_half", torch.float32, device="cpu",
                         pad=5)
    prefill, cos, sin = split(st)
    gk, gv = (torch.zeros(B, H, 6, d) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    ws = ops.workspace(prefill, budget, C, gather=True)
    for step in range(3):
        q = torch.randn(B, H * G, 1, d)
        k, v = torch.randn(B, H, 1, d), torch.randn(B, H, 1, d)
        want = ref.decode_attention(q, k, v, 0.125, prefill, cos, sin, rk, rv, rl, C, budget,
                                    "rotate_half")
        ops.decode_gather(q, k, v, list(prefill), cos, sin, gk, gv, gl, *ws, 0.125, C, budget,
                          "rotate_half")
        sel_k, sel_v, slot_chunk = ws[:3]
        got = ops.sparse_attention(q, 0.125, prefill.outlier_k, prefill.outlier_v,
                                   prefill.outlier_valid, sel_k, sel_v, slot_chunk,
                                   prefill.sparse_valid, prefill.selectable, prefill.local_k,
                                   prefill.local_v, prefill.local_valid, gk, gv, gl, C)
        close(got, want, torch.float32, f"step {step}")
        assert torch.equal(gk, rk) and torch.equal(gl, rl)
        assert (ws[4] == budget).all()  # the reference loads every selected chunk


def test_decode_gather_refuses_an_empty_workspace():
    from test_kernels import split, synthetic_state
    st = synthetic_state(1, 2, 10, 8, 64, 8, 64, 1, 9, "rotate_half", torch.float32, device="cpu")
    prefill, cos, sin = split(st)
    gk = torch.zeros(1, 2, 4, 64)
    ws = ops.workspace(prefill, 3, 8)  # the fused route's (empty on the CPU)
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64)
    with pytest.raises(ValueError, match="gather=True"):
        ref.decode_gather(q, k, k, 0.1, prefill, cos, sin, gk, gk.clone(),
                          torch.zeros(1, dtype=torch.long), *ws, 8, 3, "rotate_half")


def test_opcheck_decode_gather():
    from test_kernels import split, synthetic_state
    st = synthetic_state(1, 2, 10, 8, 64, 8, 64, 1, 9, "rotate_half", torch.float32, device="cpu")
    prefill, cos, sin = split(st)
    args = (torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64),
            list(prefill), cos, sin, torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 64),
            torch.zeros(1, dtype=torch.long), *ops.workspace(prefill, 3, 8, gather=True), 0.1, 8,
            3, "rotate_half")
    torch.library.opcheck(ops.decode_gather, args)


# ----------------------------------------------------------------------------- registration
def test_import_registers_the_lowering():
    from torch._inductor.lowering import lowerings
    assert compat.TEMPLATE_ROUTE, compat.REASON
    assert lowering.REGISTERED == ["shadowkv::sparse_attention", "shadowkv::landmark_scores",
                                   "shadowkv::rebuild_keys"]
    assert OP in lowerings
    assert lowering.sparse_attention.register()  # idempotent


def test_template_sources_are_complete():
    split_src, combine_src = tmpl.split_source(), tmpl.combine_source()
    assert split_src.startswith('{{def_kernel("Q", ') and combine_src.startswith("{{def_kernel(")
    assert "def _attend(" in split_src and "def dot(" in split_src
    for src in (split_src, combine_src):  # a mask always (store_output(mask=None) breaks)
        assert re.search(r'store_output\(\(.*\), "\w+", "\w+"', src)
    assert tmpl.SPLIT_MARKER in split_src and tmpl.COMBINE_MARKER in combine_src


@pytest.mark.parametrize("d,m_pad,elem", [(64, 16, 2), (128, 16, 2), (128, 16, 4), (128, 64, 2),
                                         (256, 128, 4)])
def test_configs(d, m_pad, elem):
    quick = tmpl.configs(d, m_pad, elem, max_autotune=False)
    full = tmpl.configs(d, m_pad, elem, max_autotune=True)
    assert quick and {repr(c) for c in quick} <= {repr(c) for c in full}
    if m_pad == 16:
        assert len(quick) >= 2 and len(full) > len(quick)
    for c in full:
        assert m_pad * c.block_n <= 4096
        assert (c.num_stages - 1) * 2 * c.block_n * d * elem <= tmpl.SHARED_BYTES


# ----------------------------------------------------------------------------- Inductor, CPU
def epilogue(*args):
    """The op followed by pointwise work that Inductor fuses into the merge kernel."""
    return (OP(*args) * 2).to(torch.bfloat16)


def generated(code) -> str:
    return "\n".join(code)


def copies(code: str) -> list:
    """Lines of the generated code that clone or copy a tensor (the graphs here need none: a
    copy would be of a state or cache-sized buffer, the gains of ShadowKV gone)."""
    return [line.strip() for line in code.splitlines()
            if re.search(r"\bclone\(|\.copy_\(|aten\.copy", line)]


def check_compiled(out, code, args):
    """Our two template kernels ran, the epilogue fused into the merge, no copies, and the
    result equals the direct formula."""
    code = generated(code)
    assert tmpl.SPLIT_MARKER in code and tmpl.COMBINE_MARKER in code
    assert "triton_poi" not in code, "the epilogue should fuse into the merge kernel"
    assert not copies(code), copies(code)
    close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("G,T,d,dtype,sizes", CASES)
def test_template_compiled_on_cpu(triton_on_cpu, G, T, d, dtype, sizes):
    args = segments(G=G, T=T, d=d, dtype=dtype, **sizes)
    out, code = run_and_get_code(torch.compile(epilogue, fullgraph=True), *args)
    check_compiled(out, code, args)


def test_template_compiled_on_cpu_with_max_autotune(triton_on_cpu):
    args = segments(G=2, d=64, N=6, K=2, Ll=5, Gcap=4, gen_len=2)
    with inductor_config.patch(max_autotune=True):
        out, code = run_and_get_code(torch.compile(epilogue), *args)
    assert tmpl.SPLIT_MARKER in generated(code)
    close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16)


def test_template_with_dynamic_segment_lengths(triton_on_cpu):
    """Prompt-dependent sizes (N, Ll, Gcap, batch) as symbols: the template reads them as
    kernel arguments; head counts and head dim are specialized."""
    f = torch.compile(epilogue, dynamic=True)
    for n, ll, gcap, gen in ((12, 13, 9, 5), (7, 4, 16, 11)):
        args = segments(G=2, N=n, Ll=ll, Gcap=gcap, gen_len=gen)
        out, code = run_and_get_code(f, *args)
        close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16, f"N={n}")
    assert tmpl.SPLIT_MARKER in generated(code)


def test_template_kernels_compile_for_hopper_without_a_gpu(triton_on_cpu, monkeypatch, tmp_path):
    """The interpreter does not compile kernels: generate the template kernels for every
    max-autotune configuration (Llama-8B head shape, bf16 and fp32) and compile them for sm_90
    with Triton's own ptxas (scripts/compile_kernels.py --inductor-kernels)."""
    kernels, all_configs = {}, tmpl.configs
    for G, d, dtype in ((4, 128, torch.bfloat16), (1, 64, torch.float32)):
        elem = torch.empty(0, dtype=dtype).element_size()
        for cfg in all_configs(d, max(16, G), elem, max_autotune=True):
            monkeypatch.setattr(tmpl, "configs", lambda *a, cfg=cfg: [cfg])
            args = segments(B=1, H=1, G=G, d=d, dtype=dtype, N=16, K=4, Ll=9, Gcap=8)
            _, code = run_and_get_code(torch.compile(epilogue), *args)
            for name, src in template_kernels(code):
                kernels[f"{name} G={G} d={d} {str(dtype)[6:]} {cfg}"] = src
            torch._dynamo.reset()
    assert len(kernels) == 2 * (len(all_configs(128, 16, 2, True)) + len(all_configs(64, 16, 4, True)))
    compile_for_sm90(kernels, tmp_path)


def template_kernels(code) -> list:
    """(name, source) of the template kernels in Inductor's generated code."""
    return [(name, src) for name, src in re.findall(
        r"async_compile\.triton\('(\w+)', '''(.*?)''', device_str", generated(code), re.S)
        if "_tem_" in name]


def compile_for_sm90(kernels: dict, tmp_path) -> None:
    """Compile generated kernels for sm_90 with Triton's own ptxas (no GPU needed):
    scripts/compile_kernels.py --inductor-kernels."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this Triton install has no NVIDIA ptxas ({ptxas})")
    import json
    import subprocess
    import sys
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(kernels))
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script, "--inductor-kernels", str(path)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed to compile" in out.stdout


def test_cpu_default_backend_keeps_the_reference():
    """Without cpu_backend="triton" the CPU op stays an opaque call of the reference."""
    args = segments(G=2, device="cpu")
    with inductor_config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(epilogue), *args)
    code = generated(code)
    assert tmpl.SPLIT_MARKER not in code and "shadowkv.sparse_attention" in code
    close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16)


def test_disabled_template_falls_back(triton_on_cpu):
    args = segments(G=2)
    lowering.sparse_attention.enable(False)
    try:
        out, code = run_and_get_code(torch.compile(epilogue), *args)
    finally:
        lowering.sparse_attention.enable(True)
    assert tmpl.SPLIT_MARKER not in generated(code)
    close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16)


def split_step(q, k, v, state, cos, sin, gk, gv, gl, sel_k, sel_v, slot_chunk, chunk_slot,
               n_load):
    """A split decode step as the rewrite emits it (scale 0.125, C 8, budget 5 chunks)."""
    st = ref.PrefillState(*state)
    scores = torch.ops.shadowkv.landmark_scores(q, st.landmarks, st.selectable, 0.125, None)
    idx = torch.topk(scores, slot_chunk.size(2), dim=-1, sorted=False).indices
    lc, ls = torch.ops.shadowkv.decode_plan(idx, k, v, state, gk, gv, gl, sel_v, slot_chunk,
                                            chunk_slot, n_load)
    torch.ops.shadowkv.rebuild_keys(sel_k, st.U, st.SV, cos, sin, lc, ls, n_load, 8,
                                    "rotate_half")
    torch.ops.shadowkv.fetch_wait(sel_v, sel_k)
    out = OP(q, 0.125, st.outlier_k, st.outlier_v, st.outlier_valid, sel_k, sel_v, slot_chunk,
             st.sparse_valid, st.selectable, st.local_k, st.local_v, st.local_valid, gk, gv, gl,
             8)
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("template", [False, True], ids=["reference", "template"])
def test_split_step_compiled_updates_state_in_place(template, request):
    """decode_plan and the rebuild mutate the generated tokens and the workspace, the attention
    reads them: compiled, the order holds, the mutation lands in the caller's tensors, and no
    cache-sized buffer is cloned. With the templates, the scores', the rebuild's and the
    attention's kernels are ours."""
    if template:
        request.getfixturevalue("triton_on_cpu")
    from test_kernels import split, synthetic_state
    B, H, G, N, C, d = 2, 2, 2, 12, 8, 64
    st = synthetic_state(B, H, N, C, d, 16, d, 2, 13, "rotate_half", torch.float32, device="cpu",
                         pad=5)
    prefill, cos, sin = split(st)
    gk, gv = (torch.zeros(B, H, 6, d) for _ in range(2))
    gl = torch.zeros(1, dtype=torch.long)
    rk, rv, rl = gk.clone(), gv.clone(), gl.clone()
    ws = ops.workspace(prefill, 5, C, gather=True)
    f = torch.compile(split_step, fullgraph=True)
    with inductor_config.patch(force_disable_caches=True):
        for step in range(2):
            q = torch.randn(B, H * G, 1, d)
            k, v = torch.randn(B, H, 1, d), torch.randn(B, H, 1, d)
            args = (q, k, v, list(prefill), cos, sin, gk, gv, gl, *ws)
            out, code = run_and_get_code(f, *args) if step == 0 else (f(*args), None)
            want = ref.decode_attention(q, k, v, 0.125, prefill, cos, sin, rk, rv, rl, C, 5,
                                        "rotate_half")
            close(out, want.to(torch.bfloat16), torch.bfloat16, f"step {step}")
            assert torch.equal(gk, rk) and torch.equal(gl, rl) and gl.item() == step + 1
            if code is not None:
                code = generated(code)
                assert (tmpl.SPLIT_MARKER in code) == template
                assert (scores_tmpl.LOGITS_MARKER in code) == template
                assert (scores_tmpl.SOFTMAX_MARKER in code) == template
                assert (chunk_gather.REBUILD_MARKER in code) == template
                assert not copies(code), copies(code)


# ----------------------------------------------------------------------------- GPU
def gpu(fn):
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    return pytest.mark.gpu(fn)


GPU_CASES = [(G, d, dtype) for G in (1, 4) for d in (64, 128)
             for dtype in (torch.bfloat16, torch.float16)]


@gpu
@pytest.mark.parametrize("G,d,dtype", GPU_CASES)
def test_gpu_template_in_generated_code(G, d, dtype):
    assert not INTERPRET, "GPU tests must run compiled kernels: unset TRITON_INTERPRET"
    # Llama-3.1-8B-like layer at 32K context, budget 2048: 256 slots of 8, 48 outlier chunks
    args = segments(B=2, H=8, G=G, d=d, N=4096, C=8, K=256, O=48, Ll=37, Gcap=64, gen_len=17,
                    dtype=dtype, device="cuda")
    with inductor_config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(epilogue, fullgraph=True), *args)
    check_compiled(out, code, args)
    close(ops.sparse_attention(*args), direct(args), dtype, "eager CUDA op (sparse_decode)")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_template_max_autotune(dtype):
    args = segments(B=1, H=8, G=4, d=128, N=1024, K=64, O=16, Ll=21, Gcap=32, gen_len=3,
                    dtype=dtype, device="cuda")
    with inductor_config.patch(force_disable_caches=True, max_autotune=True):
        out, code = run_and_get_code(torch.compile(epilogue), *args)
    assert tmpl.SPLIT_MARKER in generated(code)
    close(out, (direct(args) * 2).to(torch.bfloat16), torch.bfloat16)


@gpu
def test_gpu_triton_op_fallback_sees_the_kernels():
    """sparse_attention_triton: the route where Inductor has no template API."""
    args = segments(B=2, H=8, G=4, d=128, N=512, K=32, O=4, Ll=9, Gcap=16, gen_len=4,
                    dtype=torch.bfloat16, device="cuda")

    def f(*a):
        return torch.ops.shadowkv.sparse_attention_triton(*a) * 2

    with inductor_config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(f, fullgraph=True), *args)
    assert "_sparse_decode_split_kernel" in generated(code)
    close(out, direct(args) * 2, torch.bfloat16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_model_split_route(dtype):
    """A tiny HF model compiled with decode_route="split": the decode step's generated code
    holds our template kernels (scores and attention) and clones no cache-sized buffer, and the
    greedy tokens equal dense decoding (full rank, full budget)."""
    from cases import hf_model
    model = hf_model("llama").to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        model.compile(backend="shadowkv", options={"rank": 4096, "budget": 1 << 16,
                                                   "min_sparse_len": 0, "outlier_chunks": 3,
                                                   "decode_route": "split"})
        with inductor_config.patch(force_disable_caches=True):
            out, code = run_and_get_code(lambda: model.generate(ids, **kw))
    decode = generated(c for c in code if tmpl.SPLIT_MARKER in c)  # the decode step's graph
    assert tmpl.COMBINE_MARKER in decode and "shadowkv.decode_plan" in decode
    assert scores_tmpl.LOGITS_MARKER in decode and scores_tmpl.SOFTMAX_MARKER in decode
    assert chunk_gather.REBUILD_MARKER in decode
    assert not copies(decode), copies(decode)
    assert torch.equal(out, dense)


# ----------------------------------------------------------------------------- model, CPU
EXACT = {"rank": 4096, "budget": 1 << 16, "min_sparse_len": 0, "outlier_chunks": 3}


def greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("options", [EXACT, {"budget": 64, "rank": 24, "min_sparse_len": 0,
                                             "outlier_chunks": 6}], ids=["exact", "budget64"])
def test_split_route_on_a_model_equals_fused_route(options):
    """decode_route="split" on a tiny Llama: same tokens and logits as the fused route (the CPU
    runs the reference in both), the dense tokens at full rank and budget."""
    from cases import hf_model
    from tolerances import FP32_LOGITS
    ids = torch.randint(0, 256, (2, 300))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    runs = {}
    for route in ("fused", "split"):
        torch.manual_seed(1)  # the same random weights for each model
        model = hf_model("llama")
        model.compile(backend="shadowkv", options={**options, "decode_route": route})
        runs[route] = greedy(model, ids, mask, 12)
        sites = shadowpass.runtime_of(model).sites
        assert len(sites) == model.config.num_hidden_layers
        slots = next(iter(sites.values())).workspace[2]
        assert slots.numel() == 0 if route == "fused" else (slots >= 0).all()
    fused, split = runs["fused"], runs["split"]
    assert torch.equal(split.sequences, fused.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(split.logits, fused.logits))
    assert diff < FP32_LOGITS
    if options is EXACT:
        torch.manual_seed(1)
        dense = greedy(hf_model("llama"), ids, mask, 12)
        assert torch.equal(split.sequences, dense.sequences)


@pytest.mark.parametrize("policy,gather", [("shadowkv", False), ("streaming", True)])
def test_split_route_rewrite_emits_its_ops(tmp_path, monkeypatch, policy, gather):
    """Landmark policies: scores, top-k, decode_plan, rebuild, fetch_wait, attention. Others
    select, rebuild and fetch inside decode_gather."""
    from cases import hf_model
    monkeypatch.setenv("SHADOWPASS_DUMP_DIR", str(tmp_path))
    model = hf_model("llama")
    model.compile(backend="shadowkv", options={**EXACT, "decode_route": "split",
                                               "policy": policy})
    with torch.no_grad():
        model.generate(torch.randint(0, 256, (1, 300)), max_new_tokens=3, do_sample=False)
    after = "\n".join(p.read_text() for p in tmp_path.glob("graph_*_after.py"))
    assert ("shadowkv.decode_gather.default" in after) == gather
    for op in ("landmark_scores", "decode_plan", "rebuild_keys", "fetch_wait"):
        assert (f"shadowkv.{op}.default" in after) != gather
    assert ("torch.topk" in after) != gather
    assert "shadowkv.sparse_attention.default" in after
    assert "shadowkv.decode.default" not in after
