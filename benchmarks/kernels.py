"""Benchmark of the ShadowKV decode kernels at the Llama-3.1-8B layer shape.

    python benchmarks/kernels.py                 # 32K/64K/128K context x batch 1/8/32
    python benchmarks/kernels.py --contexts 131072 --batches 8

One attention layer: Hq=32, Hkv=8, d=128, r=160, C=8, budget 2048 tokens (K=256 chunks),
48 outlier chunks, 32 local tokens, 64 generated tokens, bf16. For each kernel: median time
(p20-p80 spread), bytes moved, achieved GB/s and the fraction of the peak measured in this run
(HBM: device-to-device copy, read+write bytes; PCIe: pinned host-to-device copy), and the max
error against ``shadowpass.reference``. Each kernel is timed inside a CUDA graph (triton's
do_bench_cudagraph), so launch overhead is not counted: the decode step replays as a graph too.
Then the whole ShadowKV step against dense SDPA over the full cache, eager and in CUDA graphs.
Needs a CUDA GPU (exits with a message otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

H, G, D, RANK, C, BUDGET, OUTLIERS, LOCAL, GEN = 8, 4, 128, 160, 8, 2048, 48, 32, 64
GEN_CAP = 256
# The step's queries: a closed walk of WALK steps around one query, q + SIGMA * z_t with z an
# AR(1) of coefficient RHO. On the CPU at the 128K shape (scripts/query_walk_hits.py,
# results/cpu/query_walk_hits.txt) its selections hit 69.6 / 85.1 / 93.1% of the time with
# chunk_cache 1 / 2 / 4, against 68.6 / 88.0 / 92.6% for SmolLM2's real ones at budget 256
# (scripts/value_cache_hits.py): it stands in for a model's decoding queries.
WALK, WALK_SIGMA, WALK_RHO = 64, 0.45, 0.8
DTYPE = torch.bfloat16
EB = 2  # bytes per bf16 element
TARGETS = {  # from issue 4; the lead checks them on an H100/H200
    "fetch_vs_h2d": 0.80, "scores_vs_hbm": 0.70, "attn_vs_sdpa": 1.3, "step_speedup_128k_b8": 5.0,
}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rep", type=int, default=60, help="ms of timed repetitions per measurement")
    p.add_argument("--miss", type=float, default=0.4,
                   help="miss fraction for the partial rebuild/fetch rows (paper: ~60%% hits)")
    p.add_argument("--chunk-caches", type=int, nargs="+", default=[1, 4],
                   help="ShadowKVConfig.chunk_cache values of the whole step, side by side")
    p.add_argument("--no-split-route", action="store_true",
                   help="skip the split route's step (its Inductor compile takes ~1 min)")
    p.add_argument("--smoke", action="store_true",
                   help="developer check of this script's code paths on the CPU under the Triton "
                        "interpreter at a tiny shape; its timings mean nothing")
    return p.parse_args()


def smoke_setup(args):
    """Shrink the shape and run on the CPU interpreter (sets TRITON_INTERPRET before import)."""
    global H, G, D, RANK, BUDGET, OUTLIERS, LOCAL, GEN, GEN_CAP
    os.environ["TRITON_INTERPRET"] = "1"
    H, G, D, RANK, BUDGET, OUTLIERS, LOCAL, GEN, GEN_CAP = 2, 2, 64, 16, 64, 2, 16, 4, 8
    args.contexts, args.batches = [512], [2]

    def timed(fn, graph=False):
        import time
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return ts[0], ts[0], ts[-1]
    return timed


def main():
    args = parse()
    smoke = args.smoke
    if smoke:
        timed = smoke_setup(args)
        dev = torch.device("cpu")
        hbm = h2d = 1e12  # placeholders: the smoke run checks code paths, not speed
        print("SMOKE RUN on the CPU interpreter: timings and fractions below are meaningless")
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py: no CUDA GPU found. This benchmark times GPU kernels; "
                 "run it on the GPU machine (H100/H200).")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks/kernels.py: unset TRITON_INTERPRET; the interpreter is not a GPU.")
    if not smoke:
        from triton.testing import do_bench, do_bench_cudagraph

        dev = torch.device("cuda")
        rep = args.rep

        def timed(fn, graph=False):
            """(p20, median, p80) in ms."""
            if graph:
                return tuple(do_bench_cudagraph(fn, rep=rep, quantiles=[0.2, 0.5, 0.8]))
            return tuple(do_bench(fn, warmup=25, rep=rep, quantiles=[0.2, 0.5, 0.8]))

        from shadowpass.bench import measure_peaks
        hbm, h2d = measure_peaks(lambda fn: timed(fn)[1], dev)
        props = torch.cuda.get_device_properties(dev)
        print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}")
        print(f"peaks (this run): HBM d2d copy {hbm / 1e9:.0f} GB/s (read+write), "
              f"pinned H2D copy {h2d / 1e9:.1f} GB/s\n")

    # ---- one pinned value pool and one dense cache, sized for the largest config, sliced after
    host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free_gpu = torch.cuda.mem_get_info(dev)[0] if not smoke else 1 << 40
    configs, skipped = [], []
    for ctx in args.contexts:
        for B in args.batches:
            n = ctx // C - LOCAL // C
            vals = B * H * n * C * D * EB
            dense = 2 * B * H * (ctx + GEN_CAP) * D * EB
            state = B * (n * C * RANK + H * n * D) * EB + 4 * B * H * G * n * 4
            if vals > 0.5 * host_ram:
                skipped.append(f"ctx {ctx} batch {B}: values {vals / 2**30:.1f} GiB > half of "
                               f"host RAM {host_ram / 2**30:.0f} GiB")
            elif dense + state + 3 * 2**30 > free_gpu:
                skipped.append(f"ctx {ctx} batch {B}: dense cache + state "
                               f"{(dense + state) / 2**30:.1f} GiB > free GPU memory "
                               f"{free_gpu / 2**30:.0f} GiB")
            else:
                configs.append((ctx, B, vals, dense))
    for s in skipped:
        print("skipped:", s)
    if not configs:
        sys.exit("nothing fits")
    pool = torch.empty(max(c[2] for c in configs) // EB, dtype=DTYPE, pin_memory=not smoke)
    step = 1 << 26
    for i in range(0, pool.numel(), step):  # fill through the GPU: fast, and no zero pages
        pool[i:i + step].copy_(torch.randn(min(step, pool.numel() - i), device=dev, dtype=DTYPE))
    dense_pool = torch.randn(max(c[3] for c in configs) // EB, device=dev, dtype=DTYPE)
    if not smoke:
        torch.cuda.synchronize()

    rows, summary = [], {}
    hdr = f"{'ctx':>7} {'B':>3} {'kernel':<28} {'median us':>10} {'p20-p80 us':>14} {'MB':>9} " \
          f"{'GB/s':>7} {'of peak':>8}  {'max err':>9}"
    print(hdr)
    print("-" * len(hdr))

    def report(ctx, B, name, t, mbytes=None, peak=None, err=None, note=""):
        med = t[1] * 1e3
        gbs = mbytes * 1e6 / (t[1] * 1e-3) / 1e9 if mbytes else None
        frac = gbs * 1e9 / peak if gbs and peak else None
        line = (f"{ctx:>7} {B:>3} {name:<28} {med:>10.1f} {t[0] * 1e3:>6.1f}-{t[2] * 1e3:<7.1f} "
                + (f"{mbytes:>9.1f} {gbs:>7.0f} {frac:>7.0%}" if gbs else " " * 26)
                + (f"  {err:>9.2e}" if err is not None else "") + (f"  {note}" if note else ""))
        print(line, flush=True)
        rows.append((ctx, B, name, med, gbs, frac, err))
        return frac

    env = {"timed": timed, "report": report, "summary": summary, "hbm": hbm, "h2d": h2d,
           "dev": dev, "pool": pool, "dense_pool": dense_pool, "miss": args.miss,
           "caches": args.chunk_caches, "split_route": not args.no_split_route}
    for ctx, B, _, _ in configs:
        bench_config(ctx, B, env)
        print()
        torch.cuda.empty_cache()

    print("targets (issue 4):")
    for ctx, B, fr in summary.get("fetch", []):
        print(f"  value fetch ctx {ctx} B {B}: {fr:.0%} of pinned H2D (target >= "
              f"{TARGETS['fetch_vs_h2d']:.0%})")
    for ctx, B, fr in summary.get("scores", []):
        print(f"  landmark scores ctx {ctx} B {B}: {fr:.0%} of HBM (target >= "
              f"{TARGETS['scores_vs_hbm']:.0%})")
    for ctx, B, r in summary.get("attn", []):
        print(f"  sparse attention ctx {ctx} B {B}: {r:.2f}x compact SDPA (target <= "
              f"{TARGETS['attn_vs_sdpa']})")
    for ctx, B, tag, hit, se, sg, most in summary.get("step", []):
        mark = "  <- target >= 5x" if (ctx, B) == (131072, 8) else ""
        eager = f"{se:.1f}x (eager), " if se else ""
        print(f"  whole step ctx {ctx} B {B} {tag} ({hit:.0%} hits): {eager}"
              f"{sg:.1f}x (CUDA graph) faster than dense; its bytes allow {most:.1f}x{mark}")


def query_walk(q, steps: int, sigma: float, rho: float, generator):
    """[steps, *q.shape]: q + sigma * z_t, z_t = rho * z_{t-1} + sqrt(1 - rho^2) * noise (unit
    variance), the queries of a decode run that drifts around q; replayed in a loop."""
    def noise():
        return torch.randn(q.shape, device=q.device, generator=generator)
    z, out = noise(), []
    for _ in range(steps):
        z = rho * z + (1 - rho ** 2) ** 0.5 * noise()
        out.append((q.float() + sigma * z).to(q.dtype))
    return torch.stack(out)


@contextlib.contextmanager
def selecting_with_torch_topk():
    """The fused step selecting with torch.topk instead of chunk_topk (side-by-side timing)."""
    from shadowpass.templates import landmark_scores as mod
    default = mod.chunk_topk
    mod.chunk_topk = lambda scores, k: scores.topk(k, dim=-1, sorted=False).indices
    try:
        yield
    finally:
        mod.chunk_topk = default


def split_step(q, k, v, state, cos, sin, gen_k, gen_v, gen_len, ws, scale, C, rope_style):
    """A decode step as decode_route="split" emits it (shadowpass.rewrite.split_decode)."""
    from shadowpass.reference import PrefillState
    st = PrefillState(*state)
    sel_k, sel_v, slot_chunk, chunk_slot, n_load = ws
    scores = torch.ops.shadowkv.landmark_scores(q, st.landmarks, st.selectable, scale, None)
    idx = torch.topk(scores, slot_chunk.size(2), dim=-1, sorted=False).indices
    load_chunk, load_slot = torch.ops.shadowkv.decode_plan(idx, k, v, state, gen_k, gen_v,
                                                           gen_len, sel_v, slot_chunk,
                                                           chunk_slot, n_load)
    torch.ops.shadowkv.rebuild_keys(sel_k, st.U, st.SV, cos, sin, load_chunk, load_slot, n_load,
                                    C, rope_style)
    torch.ops.shadowkv.fetch_wait(sel_v, sel_k)
    return torch.ops.shadowkv.sparse_attention(
        q, scale, st.outlier_k, st.outlier_v, st.outlier_valid, sel_k, sel_v, slot_chunk,
        st.sparse_valid, st.selectable, st.local_k, st.local_v, st.local_valid, gen_k, gen_v,
        gen_len, C)


def bench_config(ctx, B, env):
    """Time every kernel and the whole step for one (context, batch) at the Llama layer shape."""
    from shadowpass.templates.chunk_gather import (
        fetch_values_into,
        full_load,
        rebuild_keys_into,
        reuse_plan,
    )
    from shadowpass.templates.chunk_topk import chunk_topk
    from shadowpass.templates.landmark_scores import landmark_scores
    from shadowpass.templates.sparse_decode import sparse_decode

    from shadowpass import policies, reference as ref
    from shadowpass.kernels import (
        PIPELINE_PARTS,
        DecodeWorkspace,
        decode_attention_cuda,
        load_chunks,
    )

    timed, report, summary = env["timed"], env["report"], env["summary"]
    hbm, h2d, dev, pool, dense_pool, miss = (env[k] for k in ("hbm", "h2d", "dev", "pool",
                                                               "dense_pool", "miss"))
    torch.manual_seed(0)
    N = ctx // C - LOCAL // C
    K = BUDGET // C
    S = N * C
    Hq = H * G
    scale = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.float32).mul_(s).to(DTYPE)

    selectable = torch.ones(B, H, N, dtype=torch.bool, device=dev)
    selectable[:, :, torch.randperm(N, device=dev)[:OUTLIERS]] = False
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D)
    f = torch.arange(S, device=dev).float()[:, None] * inv
    st = ref.PrefillState(
        U=rnd(B, S, RANK, s=RANK ** -0.5), SV=rnd(B, H, RANK, D), landmarks=rnd(B, H, N, D),
        selectable=selectable, sparse_valid=torch.ones(B, S, dtype=torch.bool, device=dev),
        outlier_k=rnd(B, H, OUTLIERS * C, D), outlier_v=rnd(B, H, OUTLIERS * C, D),
        outlier_valid=torch.ones(B, H, OUTLIERS * C, dtype=torch.bool, device=dev),
        local_k=rnd(B, H, LOCAL, D), local_v=rnd(B, H, LOCAL, D),
        local_valid=torch.ones(B, LOCAL, dtype=torch.bool, device=dev),
        values=pool[:B * H * N * C * D].view(B, H, N, C, D), aux=rnd(B, H, 0, D))
    # one value per rotated pair, as reference.rope_tables keeps them
    cos, sin = (t.to(DTYPE)[None].expand(B, S, D // 2) for t in (f.cos(), f.sin()))
    gen_k, gen_v = rnd(B, H, GEN_CAP, D), rnd(B, H, GEN_CAP, D)
    gen_len = torch.tensor([GEN], device=dev)
    q = rnd(B, Hq, 1, D)

    # 1. landmark scoring (two passes) and top-k
    t = timed(lambda: landmark_scores(q, st.landmarks, st.selectable, scale, fill=-1.0),
              graph=True)
    scores = landmark_scores(q, st.landmarks, st.selectable, scale, fill=-1.0)
    want = ref.score_chunks(q, st.landmarks, st.selectable, scale)
    err = (scores.masked_fill(~st.selectable, 0) - want).abs().max().item()
    nb = (B * H * N * (D * EB + 1 + 4) + B * H * G * N * 4 * 2 + q.numel() * EB) / 1e6
    summary.setdefault("scores", []).append(
        (ctx, B, report(ctx, B, "landmark scores", t, nb, hbm, err)))
    # landmarks stored in fp8 (ShadowKVConfig.landmark_dtype): half the bytes
    lm8 = ref.store_landmarks(st.landmarks, "float8_e4m3fn", DTYPE)
    t = timed(lambda: landmark_scores(q, lm8, st.selectable, scale, fill=-1.0), graph=True)
    got = landmark_scores(q, lm8, st.selectable, scale, fill=-1.0)
    want8 = ref.score_chunks(q, lm8, st.selectable, scale)
    err = (got.masked_fill(~st.selectable, 0) - want8).abs().max().item()
    nb8 = nb - B * H * N * D * (EB - 1) / 1e6
    report(ctx, B, "landmark scores, fp8 landmarks", t, nb8, hbm, err)
    # the same op as Inductor lowers it in a compiled model (the split route's templates)
    inductor_scores = torch.compile(torch.ops.shadowkv.landmark_scores.default, fullgraph=True)
    got = inductor_scores(q, st.landmarks, st.selectable, scale, None)
    err = (got - scores).abs().max().item()
    t = timed(lambda: inductor_scores(q, st.landmarks, st.selectable, scale, None), graph=True)
    report(ctx, B, "  the same, Inductor templates", t, nb, hbm, err, "err against the kernels")
    # the same with a radius (Quest's bound: quest, shadowkv_hybrid's fallback heads)
    radius = rnd(B, H, N, D).abs()
    t = timed(lambda: landmark_scores(q, st.landmarks, st.selectable, scale, fill=-1.0,
                                      radius=radius), graph=True)
    got = landmark_scores(q, st.landmarks, st.selectable, scale, fill=-1.0, radius=radius)
    want_b = policies.landmark_scores(q, st.landmarks, st.selectable, scale, radius)
    err = (got.masked_fill(~st.selectable, 0) - want_b).abs().max().item()
    report(ctx, B, "bound scores (landmarks + radius)", t, nb + B * H * N * D * EB / 1e6, hbm, err)
    t = timed(lambda: scores.topk(K, dim=-1, sorted=False), graph=True)
    idx = scores.topk(K, dim=-1, sorted=False).indices
    want_idx = ref.select_chunks(want, st.selectable, K)[0]
    key = want.masked_fill(~st.selectable, -1)

    def selection_err(ids):  # ties may pick other ids: compare the selected scores
        return (key.gather(2, ids).sort(-1).values
                - key.gather(2, want_idx).sort(-1).values).abs().max().item()
    report(ctx, B, "top-k (torch.topk, unsorted)", t, B * H * (N * 4 + K * 12) / 1e6, hbm,
           selection_err(idx), "err = selected scores")
    t_k = timed(lambda: chunk_topk(scores, K), graph=True)
    report(ctx, B, "top-k (chunk_topk)", t_k, B * H * (N * 4 + K * 12) / 1e6, hbm,
           selection_err(chunk_topk(scores, K)),
           f"err = selected scores; {t[1] / t_k[1]:.2f}x torch.topk's speed")
    for warps in (4, 16):  # the default is 8
        t_w = timed(lambda w=warps: chunk_topk(scores, K, num_warps=w), graph=True)
        report(ctx, B, f"  the same, {warps} warps", t_w)

    # 2. reuse plan
    slot_chunk = torch.full((B, H, K), -1, dtype=torch.int32, device=dev)
    chunk_slot = torch.full((B, H, N), -1, dtype=torch.int32, device=dev)
    t = timed(lambda: reuse_plan(idx, slot_chunk, chunk_slot), graph=True)
    report(ctx, B, "reuse plan", t)
    big = max(env["caches"])
    if big > 1:  # a value cache: the eviction ranks the spare slots by score (a sort)
        cache_slots = torch.full((B, H, big * K), -1, dtype=torch.int32, device=dev)
        reuse_plan(idx, cache_slots, chunk_slot.fill_(-1), scores)
        t = timed(lambda: reuse_plan(idx, cache_slots, chunk_slot, scores), graph=True)
        report(ctx, B, f"reuse plan, chunk_cache {big}", t)

    # 3. key rebuild and value fetch, all chunks missed and a partial miss
    lc, ls, nl = full_load(idx)
    sel_k = torch.empty(B, H, K * C, D, device=dev, dtype=DTYPE)
    sel_v = torch.empty_like(sel_k)
    want_k = ref.rebuild_keys(st.U, st.SV, cos, sin, idx, C, "rotate_half")
    rebuild_keys_into(sel_k, st.U, st.SV, cos, sin, lc, ls, nl, C, "rotate_half")
    err_k = ((sel_k.float() - want_k).abs().max() / want_k.abs().max()).item()
    fetch_values_into(sel_v, st.values, lc, ls, nl)
    err_v = (sel_v.cpu().float() - ref.fetch_values(st.values, idx.cpu(), "cpu").float()).abs().max().item()
    for frac in (1.0, miss):
        n = torch.full_like(nl, max(1, round(frac * K)))
        loaded = B * H * int(n[0, 0]) * C
        t = timed(lambda n=n: rebuild_keys_into(sel_k, st.U, st.SV, cos, sin, lc, ls, n, C,
                                                "rotate_half"), graph=True)
        # per row: U, cos and sin (D/2 each) read, the key written; SV once per (b, h)
        nb = (loaded * (RANK + D + D) * EB + B * H * RANK * D * EB) / 1e6
        report(ctx, B, f"key rebuild {frac:.0%} miss", t, nb, hbm, err_k, "err relative to max")
        t = timed(lambda n=n: rebuild_keys_into(sel_k, st.U, st.SV, cos, sin, lc, ls, n, C,
                                                "rotate_half", block_rows=32), graph=True)
        report(ctx, B, "  the same, 32 rows a program", t, nb, hbm)
        t = timed(lambda n=n: fetch_values_into(sel_v, st.values, lc, ls, n), graph=True)
        fr = report(ctx, B, f"value fetch {frac:.0%} miss", t, loaded * D * EB / 1e6, h2d, err_v,
                    "of pinned H2D")
        if frac == 1.0:
            summary.setdefault("fetch", []).append((ctx, B, fr))
        for overlap in (False, True):
            t = timed(lambda n=n, o=overlap: load_chunks(sel_k, sel_v, st, cos, sin, lc, ls, n, C,
                                                         "rotate_half", overlap=o), graph=True)
            report(ctx, B, f"rebuild {'||' if overlap else '+'} fetch {frac:.0%} miss", t,
                   note="fetch on a side stream" if overlap else "one stream")

    # 4. sparse attention against SDPA over a compact buffer of the same size
    P = OUTLIERS * C + K * C + LOCAL + GEN
    slots = idx.to(torch.int32)

    def attn():
        return sparse_decode(q, scale, st.outlier_k, st.outlier_v, st.outlier_valid, sel_k, sel_v,
                             slots, st.sparse_valid, st.selectable, st.local_k, st.local_v,
                             st.local_valid, gen_k, gen_v, gen_len, chunk_size=C)
    t_attn = timed(attn, graph=True)
    nb = (2 * B * H * P * D * EB + 2 * q.numel() * EB) / 1e6
    report(ctx, B, "sparse attention", t_attn, nb, hbm)
    ck, cv = rnd(B, H, P, D), rnd(B, H, P, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_c = timed(lambda: sdpa(q, ck, cv, scale=scale, enable_gqa=True), graph=True)
    report(ctx, B, "SDPA, compact buffer", t_c, nb, hbm)
    summary.setdefault("attn", []).append((ctx, B, t_attn[1] / t_c[1]))
    if big > 1:  # the same chunks read through a value cache's slot list
        spots = torch.rand(B * H, big * K, device=dev).argsort(-1)[:, :K].view(B, H, K)
        cache_slots = torch.full((B, H, big * K), -1, dtype=torch.int32, device=dev)
        cache_slots.scatter_(2, spots, slots)
        cache_k = torch.zeros(B, H, big * K, C, D, device=dev, dtype=DTYPE)
        cache_v = torch.zeros_like(cache_k)
        rows = spots[..., None, None].expand(B, H, K, C, D)
        cache_k.scatter_(2, rows, sel_k.view(B, H, K, C, D))
        cache_v.scatter_(2, rows, sel_v.view(B, H, K, C, D))
        cache_k, cache_v = cache_k.flatten(2, 3), cache_v.flatten(2, 3)
        sel_slot = spots.to(torch.int32)

        def cached_attn():
            return sparse_decode(q, scale, st.outlier_k, st.outlier_v, st.outlier_valid, cache_k,
                                 cache_v, cache_slots, st.sparse_valid, st.selectable, st.local_k,
                                 st.local_v, st.local_valid, gen_k, gen_v, gen_len, chunk_size=C,
                                 sel_slot=sel_slot)
        err = (cached_attn().float() - attn().float()).abs().max().item()
        t = timed(cached_attn, graph=True)
        report(ctx, B, f"  through chunk_cache {big}", t, nb, hbm, err,
               f"err against the above; {t[1] / t_c[1]:.2f}x compact SDPA")

    # 5. the whole step (scores, top-k, plan, rebuild, fetch, attention) against dense SDPA,
    # for each chunk_cache, over the query walk (WALK)
    k_new, v_new = rnd(B, H, 1, D), rnd(B, H, 1, D)
    ring = query_walk(q, WALK, WALK_SIGMA, WALK_RHO, g)  # picked on the device (graph-safe)
    it = torch.zeros(1, dtype=torch.long, device=dev)

    def shadow_step(ws, parts=None):
        gen_len.fill_(GEN - 1)  # keep the generated length fixed across repetitions
        it.add_(1).remainder_(ring.shape[0])
        return decode_attention_cuda(ring.index_select(0, it)[0], k_new, v_new, scale, st,
                                     cos, sin, gen_k, gen_v, gen_len, C, K, "rotate_half",
                                     workspace=ws, parts=parts)

    def steady_hit_rate(ws):
        """Two laps of the walk; the hit rate over the second."""
        ws.reset()
        rates = []
        for _ in range(2 * ring.shape[0]):
            shadow_step(ws)
            rates.append(ws.hit_rate(K))
        return sum(rates[ring.shape[0]:]) / ring.shape[0]

    steps = {}
    big_cache = max(env["caches"])
    state_of = {"model": st, "fp8": st._replace(landmarks=lm8)}
    for cache, lms in [(c, "model") for c in env["caches"]] + [(big_cache, "fp8")]:
        st = state_of[lms]
        ws = DecodeWorkspace.allocate(st, K, C, chunk_cache=cache)
        hit = steady_hit_rate(ws)
        rk, rv, rl = gen_k.clone(), gen_v.clone(), torch.tensor([GEN - 1], device=dev)
        got = shadow_step(ws)
        want_o = ref.decode_attention(ring[it.item()], k_new, v_new, scale, st, cos, sin, rk, rv,
                                      rl, C, K, "rotate_half")
        err = (got.float() - want_o.float()).abs().max().item()
        tag = f"chunk_cache {cache}" + (", fp8 landmarks" if lms == "fp8" else "")
        t_se = None
        if cache == 1:
            t_se = timed(lambda: shadow_step(ws))
            report(ctx, B, "ShadowKV step, eager", t_se, err=err, note=f"hit rate {hit:.0%}, {tag}")
        t_sg = timed(lambda: shadow_step(ws), graph=True)
        report(ctx, B, "ShadowKV step, CUDA graph", t_sg, err=err if t_se is None else None,
               note=f"hit rate {hit:.0%}, {tag}, {min(B, PIPELINE_PARTS)} batch slices")
        with selecting_with_torch_topk():
            t = timed(lambda: shadow_step(ws), graph=True)
        report(ctx, B, "  the same, torch.topk", t,
               note=f"{t[1] / t_sg[1]:.2f}x the time of the step with chunk_topk")
        depths = (1, 2, 8) if cache == 1 else (1,)  # the pipeline's other depths
        if B > 1 and lms == "model":
            for parts in [p for p in depths if p <= B]:
                t = timed(lambda p=parts: shadow_step(ws, p), graph=True)
                report(ctx, B, f"  the same, {parts} batch slice{'s' if parts > 1 else ''}", t)
        steps[tag] = (hit, t_se, t_sg, D * st.landmarks.element_size())
        del ws
    st = state_of["model"]
    if env["split_route"]:
        split_route_step(ctx, B, st, env, ring, it, k_new, v_new, cos, sin, gen_k, gen_v, gen_len,
                         scale, K)
    Ld = ctx + GEN
    dk = dense_pool[:B * H * Ld * D].view(B, H, Ld, D)
    dv = dense_pool[B * H * Ld * D:2 * B * H * Ld * D].view(B, H, Ld, D)
    nb = 2 * B * H * Ld * D * EB / 1e6
    t_de = timed(lambda: sdpa(q, dk, dv, scale=scale, enable_gqa=True))
    report(ctx, B, "dense SDPA, eager", t_de, nb, hbm)
    t_dg = timed(lambda: sdpa(q, dk, dv, scale=scale, enable_gqa=True), graph=True)
    speedups = ", ".join(f"{tag}: {t_dg[1] / t_sg[1]:.1f}x"
                         for tag, (_, _, t_sg, _) in steps.items())
    report(ctx, B, "dense SDPA, CUDA graph", t_dg, nb, hbm,
           note=f"dense / ShadowKV step in CUDA graphs: {speedups}")
    for tag, (hit, t_se, t_sg, lm_bytes) in steps.items():
        # what no kernels can beat: the landmarks cross HBM before the selection is known, and
        # the missed values cross PCIe only after it (measured peaks, this run's hit rate)
        bound = (B * H * N * lm_bytes / hbm + B * H * K * (1 - hit) * C * D * EB / h2d) * 1e3
        report(ctx, B, "bytes: landmarks, then misses", (bound,) * 3,
               note=f"{tag}, {hit:.0%} hits: dense graph / this = "
                    f"{t_dg[1] / bound:.1f}x, the most a step with one selection for the whole "
                    f"batch could gain")
        summary.setdefault("step", []).append(
            (ctx, B, tag, hit, t_de[1] / t_se[1] if t_se else None, t_dg[1] / t_sg[1],
             t_dg[1] / bound))
    torch.cuda.empty_cache()


def split_route_step(ctx, B, st, env, ring, it, k_new, v_new, cos, sin, gen_k, gen_v, gen_len,
                     scale, K):
    """decode_route="split": Inductor's code runs the scores, rebuild and attention templates,
    top-k, and decode_plan (reuse plan, the fetch started on a side stream)."""
    from shadowpass import reference as ref
    from shadowpass.kernels import DecodeWorkspace
    timed, report, dev = env["timed"], env["report"], env["dev"]
    split_ws = DecodeWorkspace.allocate(st, K, C)
    split = torch.compile(split_step, fullgraph=True)

    def inductor_step():
        gen_len.fill_(GEN - 1)
        it.add_(1).remainder_(ring.shape[0])
        return split(ring.index_select(0, it)[0], k_new, v_new, list(st), cos, sin, gen_k, gen_v,
                     gen_len, split_ws.tensors(), scale, C, "rotate_half")

    for _ in range(2 * ring.shape[0]):  # compile, then reach the steady hit rate
        inductor_step()
    rk, rv, rl = gen_k.clone(), gen_v.clone(), torch.tensor([GEN - 1], device=dev)
    got = inductor_step()
    want_o = ref.decode_attention(ring[it.item()], k_new, v_new, scale, st, cos, sin, rk, rv, rl,
                                  C, K, "rotate_half")
    err = (got.float() - want_o.float()).abs().max().item()
    t = timed(inductor_step)
    report(ctx, B, "split step, Inductor", t, err=err,
           note=f"hit rate {split_ws.hit_rate():.0%}, templates + topk + decode_plan")
    t = timed(inductor_step, graph=True)
    report(ctx, B, "  the same, CUDA graph", t)


if __name__ == "__main__":
    main()
