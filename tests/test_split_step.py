"""The ops of a split decode step (``decode_route="split"``) and their Inductor lowerings:
``shadowkv::landmark_scores`` (two Triton templates), ``torch.topk``, ``shadowkv::decode_plan``
(opaque: reuse plan, value fetch on a side stream), ``shadowkv::rebuild_keys`` (one template,
writing the workspace in place) and ``shadowkv::fetch_wait``; the attention is
tests/test_lowering.py's.

CPU (CI): the ops against their references and the launched kernels (interpreter); fake/
opcheck; the lowerings compiled by Inductor for the CPU with ``cpu_backend="triton"`` (fixture
``triton_on_cpu``) and run by the interpreter, and compiled for sm_90 with ptxas. GPU
(``-m gpu``): the same at a Llama-3.1-8B layer's size at 128K context, with
``run_and_get_code`` checks:

    pytest -m gpu tests/test_split_step.py
"""
import functools
import math

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code
from test_lowering import (  # skips this module too where Triton is missing
    DEV,
    compile_for_sm90,
    copies,
    generated,
    gpu,
    template_kernels,
)
from tolerances import SCORES

from shadowpass import lowering, ops
from shadowpass import reference as ref
from shadowpass.templates import chunk_gather
from shadowpass.templates import landmark_scores as tmpl
from shadowpass.templates.common import INTERPRET

OP = torch.ops.shadowkv.landmark_scores.default


def inputs(B=2, H=2, G=2, T=1, d=64, N=45, dtype=torch.float32, radius=False, device=DEV,
           seed=0):
    """landmark_scores' arguments: N not a multiple of any block, a fifth of the chunks
    unselectable and one head with none selectable (its scores are all -1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, T, d, generator=g).to(device, dtype)
    lm = torch.randn(B, H, N, d, generator=g).to(device, dtype)
    sel = torch.rand(B, H, N, generator=g) > 0.2
    sel[-1, 0] = False
    rad = torch.rand(B, H, N, d, generator=g).to(device, dtype) if radius else None
    if rad is not None and H > 1:
        rad[:, 1] = 0  # a landmark head beside a Quest-bound head
    return q, lm, sel.to(device), 1 / math.sqrt(d), rad


def expected(q, lm, sel, scale, rad):
    return ref.selection_scores(q.cpu(), lm.cpu(), sel.cpu(), scale,
                                None if rad is None else rad.cpu())


def close(got, want):
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=SCORES[0], rtol=SCORES[1])


def top(q, lm, sel, scale, rad, k=7):
    """Scores and their top-k, as the split decode step runs them."""
    scores = OP(q, lm, sel, scale, rad)
    return scores, torch.topk(scores, k, dim=-1, sorted=False).indices


def same_selection(idx, scores, k):
    """idx holds a top-k of scores (ties may pick either chunk): its scores are the k largest."""
    picked = scores.gather(-1, idx.cpu()).sort(-1).values
    torch.testing.assert_close(picked, scores.topk(k, -1).values.sort(-1).values)


CASES = [  # G, T, d, dtype, radius
    pytest.param(1, 1, 64, torch.float32, False, id="mha-fp32"),
    pytest.param(4, 1, 128, torch.bfloat16, False, id="gqa4-bf16-d128"),
    pytest.param(2, 3, 64, torch.float16, False, id="gqa2-T3-fp16"),
    pytest.param(2, 1, 128, torch.float32, True, id="quest-bound-fp32"),
    pytest.param(4, 2, 64, torch.bfloat16, True, id="quest-bound-bf16-T2"),
]


# ----------------------------------------------------------------------------- the ops
def test_reference_ranks_unselectable_chunks_last():
    q, lm, sel, scale, rad = inputs()
    scores = ops.landmark_scores(q.cpu(), lm.cpu(), sel.cpu(), scale)
    assert (scores[~sel.cpu()] == -1).all() and (scores[sel.cpu()] >= 0).all()
    close(scores, ref.score_chunks(q.cpu(), lm.cpu(), sel.cpu(), scale).masked_fill(~sel.cpu(), -1))


@pytest.mark.parametrize("G,T,d,dtype,radius", CASES)
def test_launched_kernels_match_reference(G, T, d, dtype, radius):
    args = inputs(G=G, T=T, d=d, dtype=dtype, radius=radius)
    q, lm, sel, scale, rad = args
    close(tmpl.landmark_scores(q, lm, sel, scale, fill=-1.0, radius=rad), expected(*args))


@pytest.mark.parametrize("radius", [False, True])
def test_opcheck_landmark_scores(radius):
    q, lm, sel, scale, rad = inputs(device="cpu", radius=radius)
    torch.library.opcheck(OP, (q, lm, sel, scale, rad))


def test_fake_checks_shapes():
    q, lm, sel, scale, _ = inputs(device="cpu")
    with pytest.raises(Exception, match="multiple of KV heads"):
        OP(q[:, :3], lm, sel, scale, None)
    with pytest.raises(Exception, match=r"selectable must be \[B, Hkv, N\]"):
        torch.library.opcheck(OP, (q, lm, sel[:, :, :-1], scale, None))


def load_args(B=2, H=2, N=12, C=8, d=64, K=5, seed=0):
    from test_kernels import split, synthetic_state
    st = synthetic_state(B, H, N, C, d, 16, d, 2, 13, "rotate_half", torch.float32,
                         device="cpu", pad=5)
    prefill, cos, sin = split(st)
    ws = ops.workspace(prefill, K, C, gather=True)
    gk, gv = (torch.zeros(B, H, 6, d) for _ in range(2))
    return prefill, cos, sin, ws, gk, gv, torch.zeros(1, dtype=torch.long)


def test_plan_then_rebuild_equals_decode_gather():
    """decode_plan + rebuild_keys + fetch_wait of the top-k equal decode_gather, which selects
    itself."""
    prefill, cos, sin, ws, gk, gv, gl = load_args()
    B, H, d = 2, 2, 64
    q, k, v = torch.randn(B, 2 * H, 1, d), torch.randn(B, H, 1, d), torch.randn(B, H, 1, d)
    scores = ops.landmark_scores(q, prefill.landmarks, prefill.selectable, 0.125)
    idx = scores.topk(5, -1).indices
    sel_k, sel_v, slot_chunk, chunk_slot, n_load = ws
    lc, ls = ops.decode_plan(idx, k, v, list(prefill), gk, gv, gl, sel_v, slot_chunk,
                             chunk_slot, n_load)
    ops.rebuild_keys(sel_k, prefill.U, prefill.SV, cos, sin, lc, ls, n_load, 8, "rotate_half")
    ops.fetch_wait(sel_v, sel_k)
    ws2 = ops.workspace(prefill, 5, 8, gather=True)
    gk2, gv2, gl2 = torch.zeros_like(gk), torch.zeros_like(gv), torch.zeros_like(gl)
    ops.decode_gather(q, k, v, list(prefill), cos, sin, gk2, gv2, gl2, *ws2, 0.125, 8, 5,
                      "rotate_half")
    for a, b in zip((gk, gv, gl, *ws), (gk2, gv2, gl2, *ws2)):
        assert torch.equal(a, b)
    assert gl.item() == 1 and torch.equal(slot_chunk, idx.to(slot_chunk.dtype))


def test_opcheck_plan_rebuild_wait():
    prefill, cos, sin, ws, gk, gv, gl = load_args()
    sel_k, sel_v, slot_chunk, chunk_slot, n_load = ws
    idx = torch.stack([torch.randperm(12)[:5] for _ in range(4)]).view(2, 2, 5)
    k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    plan_args = (idx, k, v, list(prefill), gk, gv, gl, sel_v, slot_chunk, chunk_slot, n_load)
    torch.library.opcheck(torch.ops.shadowkv.decode_plan.default, plan_args,
                          test_utils=("test_schema", "test_faketensor"))
    lc, ls = ops.decode_plan(*plan_args)
    torch.library.opcheck(torch.ops.shadowkv.rebuild_keys.default,
                          (sel_k, prefill.U, prefill.SV, cos, sin, lc, ls, n_load, 8,
                           "rotate_half"))
    torch.library.opcheck(torch.ops.shadowkv.fetch_wait.default, (sel_v, sel_k))


def rebuild_args(B=2, H=2, N=11, C=8, d=64, r=40, K=5, rd=None, style="rotate_half",
                 dtype=torch.float32, hits=2, device=DEV, seed=0):
    """rebuild_keys' arguments: a workspace of K slots that already holds keys (nan, so a slot
    written by mistake shows), a load list of K - hits missed chunks into distinct slots."""
    from test_kernels import distinct_chunks, synthetic_state
    st = synthetic_state(B, H, N, C, d, r, d if rd is None else rd, 0, 0, style, dtype,
                         device="cpu")
    g = torch.Generator().manual_seed(seed)
    chunks = distinct_chunks(B, H, N, K, seed=seed).to(torch.int32)
    slots = torch.stack([torch.randperm(K, generator=g) for _ in range(B * H)]).view(B, H, K)
    n_load = torch.full((B, H), K - hits, dtype=torch.int32)
    n_load[0, 0] = 0  # a head with every chunk a hit
    n_load[-1, -1] = K  # and one with none
    sel_k = torch.full((B, H, K * C, d), float("nan"), dtype=dtype)
    args = (sel_k, st.U, st.SV, st.cos, st.sin, chunks, slots.to(torch.int32), n_load, C, style)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def rebuilt(args):
    """The reference's workspace after rebuild_keys (on the CPU)."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    cpu[0] = cpu[0].clone()
    ref.rebuild_into(*cpu)
    return cpu[0]


def close_keys(got, want, dtype):
    from tolerances import KERNEL_BF16, KERNEL_FP32
    atol, rtol = KERNEL_FP32 if dtype == torch.float32 else KERNEL_BF16
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=atol, rtol=rtol,
                               equal_nan=True)


REBUILD_CASES = [  # d, rotary dims, style, dtype
    pytest.param(64, None, "rotate_half", torch.float32, id="full-rotary-fp32"),
    pytest.param(128, None, "rotate_half", torch.bfloat16, id="full-rotary-bf16-d128"),
    pytest.param(64, 32, "rotate_half", torch.float32, id="partial-rotary"),
    pytest.param(64, None, "interleaved", torch.bfloat16, id="interleaved-bf16"),
    pytest.param(64, 0, "none", torch.float32, id="no-rope"),
]


@pytest.mark.parametrize("d,rd,style,dtype", REBUILD_CASES)
def test_rebuild_reference_matches_the_kernel(d, rd, style, dtype):
    """Only the listed slots change (the nan of the others stays), in both."""
    args = rebuild_args(d=d, rd=rd, style=style, dtype=dtype)
    want = rebuilt(args)
    assert want.isnan().any() and not want.isnan().all()
    chunk_gather.rebuild_keys_into(*args)
    close_keys(args[0], want, dtype)


def test_fetch_wait_without_a_pending_fetch_is_a_no_op():
    sel_v, sel_k = torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    before = sel_v.clone()
    ops.fetch_wait(sel_v, sel_k)
    assert torch.equal(sel_v, before)


# ----------------------------------------------------------------------------- Inductor, CPU
def check_compiled(fn, args, k=7, **compile_kw):
    (scores, idx), code = run_and_get_code(torch.compile(fn, **compile_kw), *args)
    code = generated(code)
    assert tmpl.LOGITS_MARKER in code and tmpl.SOFTMAX_MARKER in code
    want = expected(*args)
    close(scores, want)
    same_selection(idx, want, k)
    return code


@pytest.mark.parametrize("G,T,d,dtype,radius", CASES)
def test_templates_compiled_on_cpu(triton_on_cpu, G, T, d, dtype, radius):
    check_compiled(top, inputs(G=G, T=T, d=d, dtype=dtype, radius=radius), fullgraph=True)


def test_templates_with_max_autotune(triton_on_cpu):
    """Every logits choice is generated and benchmarked; the chosen one computes the scores."""
    with inductor_config.patch(max_autotune=True):
        check_compiled(top, inputs(G=4, d=128, radius=True))


def test_templates_with_a_dynamic_prompt_length(triton_on_cpu):
    """The chunk count N and the batch as symbols: one compiled graph serves both prompts."""
    for n, b in ((45, 2), (70, 3)):
        check_compiled(top, inputs(B=b, N=n, G=2), dynamic=True)


def test_non_contiguous_query(triton_on_cpu):
    """q as the model makes it (a transposed view) is copied to contiguous, a few KB."""
    q, lm, sel, scale, rad = inputs(G=2, T=2)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    check_compiled(top, (qt, lm, sel, scale, rad))


def test_templates_compile_for_hopper_without_a_gpu(triton_on_cpu, tmp_path, monkeypatch):
    """The interpreter does not compile kernels: generate the scores' templates at the
    Llama-8B head shape (bf16; fp32 with a radius) and the GPU's chunk tiles, and the rebuild's
    (full and partial rotary), and compile them for sm_90 with Triton's ptxas."""
    gpu_tiles = functools.partial(tmpl.block_chunks, interpret=False)
    monkeypatch.setattr(tmpl, "block_chunks", gpu_tiles)
    kernels = {}
    for dtype, radius in ((torch.bfloat16, False), (torch.float32, True)):
        _, code = run_and_get_code(torch.compile(top), *inputs(B=1, H=2, G=4, d=128, N=300,
                                                               dtype=dtype, radius=radius))
        for name, src in template_kernels(code):
            kernels[f"{name} {str(dtype)[6:]} radius={radius}"] = src
        torch._dynamo.reset()
    for dtype, rd in ((torch.bfloat16, None), (torch.float32, 64)):  # full and partial rotary
        _, code = run_and_get_code(torch.compile(rebuild_step),
                                   *rebuild_args(B=1, d=128, r=160, rd=rd, dtype=dtype)[:-2])
        for name, src in template_kernels(code):
            kernels[f"{name} {str(dtype)[6:]} rd={rd}"] = src
        torch._dynamo.reset()
    assert len(kernels) == 6, list(kernels)
    compile_for_sm90(kernels, tmp_path)


def test_too_many_query_rows_fall_back(triton_on_cpu, caplog):
    """G * T above the rows a program holds: the op stays opaque (the reference here) and the
    debug log says why."""
    args = inputs(G=4, T=40, N=20)
    with caplog.at_level("DEBUG", logger="shadowpass"):
        (scores, _), code = run_and_get_code(torch.compile(top), *args)
    assert tmpl.LOGITS_MARKER not in generated(code)
    assert "4 x 40 query rows per KV head exceed 128" in caplog.text
    close(scores, expected(*args))


def rebuild_step(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load):
    """The rebuild as the split route emits it, then a read of the workspace."""
    torch.ops.shadowkv.rebuild_keys(sel_k, U, SV, cos, sin, load_chunk, load_slot, n_load,
                                    REBUILD_C, REBUILD_STYLE[0])
    return sel_k.sum(-1)


REBUILD_C, REBUILD_STYLE = 8, ["rotate_half"]


def check_rebuild_compiled(args, **compile_kw):
    want = rebuilt(args)
    REBUILD_STYLE[0] = args[-1]
    total, code = run_and_get_code(torch.compile(rebuild_step, **compile_kw), *args[:-2])
    code = generated(code)
    assert chunk_gather.REBUILD_MARKER in code
    assert not copies(code), copies(code)  # the workspace is written in place
    close_keys(args[0], want, args[0].dtype)
    return code


@pytest.mark.parametrize("d,rd,style,dtype", REBUILD_CASES)
def test_rebuild_template_compiled_on_cpu(triton_on_cpu, d, rd, style, dtype):
    check_rebuild_compiled(rebuild_args(d=d, rd=rd, style=style, dtype=dtype), fullgraph=True)


def test_rebuild_template_with_max_autotune(triton_on_cpu):
    with inductor_config.patch(max_autotune=True):
        check_rebuild_compiled(rebuild_args(d=128, dtype=torch.bfloat16))


def test_rebuild_template_with_dynamic_sizes(triton_on_cpu):
    """The prompt's chunk count and the batch as symbols."""
    for n, b in ((11, 2), (17, 3)):
        check_rebuild_compiled(rebuild_args(B=b, N=n), dynamic=True)


def test_rebuild_template_disabled_falls_back(triton_on_cpu):
    args = rebuild_args()
    want = rebuilt(args)
    lowering.key_rebuild.enable(False)
    try:
        _, code = run_and_get_code(torch.compile(rebuild_step), *args[:-2])
    finally:
        lowering.key_rebuild.enable(True)
    assert chunk_gather.REBUILD_MARKER not in generated(code)
    close_keys(args[0], want, args[0].dtype)


def test_cpu_default_backend_keeps_the_reference():
    args = inputs(device="cpu")
    with inductor_config.patch(force_disable_caches=True):
        (scores, _), code = run_and_get_code(torch.compile(top), *args)
    code = generated(code)
    assert tmpl.LOGITS_MARKER not in code and "shadowkv.landmark_scores" in code
    close(scores, expected(*args))


def test_disabled_template_falls_back(triton_on_cpu):
    args = inputs()
    lowering.landmark_scores.enable(False)
    try:
        (scores, _), code = run_and_get_code(torch.compile(top), *args)
    finally:
        lowering.landmark_scores.enable(True)
    assert tmpl.LOGITS_MARKER not in generated(code)
    close(scores, expected(*args))


# ----------------------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("dtype,radius", [(torch.bfloat16, False), (torch.float16, False),
                                          (torch.bfloat16, True), (torch.float32, False)])
def test_gpu_templates_at_128k(dtype, radius):
    """Llama-3.1-8B layer at 128K context (8 KV heads, G = 4, chunks of 8), batch 8, budget
    2048: the templates run in the generated code and pick the reference's top-k scores."""
    assert not INTERPRET, "GPU tests must run compiled kernels: unset TRITON_INTERPRET"
    args = inputs(B=8, H=8, G=4, d=128, N=16384, dtype=dtype, radius=radius, device="cuda")
    with inductor_config.patch(force_disable_caches=True):
        check_compiled(lambda *a: top(*a, k=256), args, k=256, fullgraph=True)


@gpu
@pytest.mark.parametrize("dtype,rd", [(torch.bfloat16, None), (torch.bfloat16, 64),
                                      (torch.float16, None)])
def test_gpu_rebuild_template_at_128k(dtype, rd):
    """Llama-3.1-8B layer at 128K (rank 160, 256 slots of 8), batch 4, 40% of the chunks
    missed: the template writes only the missed slots, as the reference does."""
    assert not INTERPRET, "GPU tests must run compiled kernels: unset TRITON_INTERPRET"
    args = rebuild_args(B=4, H=8, N=16384, C=8, d=128, r=160, K=256, rd=rd, dtype=dtype,
                        hits=154, device="cuda")
    with inductor_config.patch(force_disable_caches=True):
        check_rebuild_compiled(args, fullgraph=True)
