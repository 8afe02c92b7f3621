"""End-to-end decode throughput and memory: ShadowKV against dense attention on one GPU.

The Llama-3.1-8B architecture with random bf16 weights built on the GPU (no download). For
each context, dense runs HF SDPA over a static cache, compiled (CUDA graphs), at the largest
batch its GPU memory holds; shadowpass runs the model compiled with the shadowkv backend at the
largest batch that GPU and pinned host memory hold. Reported: decode tokens/s over `--gen`
tokens, prefill time (one sequence, dense and shadowpass), peak GPU and
pinned host memory, the cache-hit rate, and the ShadowKV step against its roofline bound from
the HBM and PCIe bandwidths measured in the same run.

Shortcuts, all of which leave a decode step's cost unchanged: the dense cache is filled with
random keys and values instead of a real prefill (its step reads every cached byte whatever the
values), and shadowpass prefills one real sequence per context and copies its state to every
row of the batch (each row still has its own state, pinned values and selection).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from .hf import cache_kwargs

log = logging.getLogger(__name__)
GIB = 1 << 30
WARMUP_STEPS = 3  # decode steps before timing (the first compiles)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 61440, 122880],
                   help="prompt lengths in tokens (32K, and the paper's 60K and 122K)")
    p.add_argument("--gen", type=int, default=64, help="decode steps timed per run (>= 64)")
    p.add_argument("--layers", type=int, default=32,
                   help="decoder layers (32 = Llama-3.1-8B; fewer for a quick check)")
    p.add_argument("--budget", type=int, default=2048, help="ShadowKV token budget per step")
    p.add_argument("--rank", type=int, default=160, help="ShadowKV key rank")
    p.add_argument("--batches", type=int, nargs="*", default=None,
                   help="batch sizes to run besides the largest that fits (tokens/s vs batch; "
                        "default 1, for its latency; the flag alone: only the largest)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="cap on the batch size tried (default: what memory allows)")
    p.add_argument("--host-fraction", type=float, default=0.85,
                   help="fraction of available host memory shadowpass may pin for values")
    p.add_argument("--gpu-reserve-gib", type=float, default=6.0,
                   help="GPU memory kept free for activations and workspaces when sizing batches")
    p.add_argument("--methods", nargs="+", choices=("shadowkv", "dense"),
                   default=["shadowkv", "dense"],
                   help="which side to run (one side per call keeps each GPU job short at 60K+)")
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 2],
                   help="decode_lanes values run side by side at each shadowkv batch of 4 or more "
                        "(batch lanes interleaved site by site: shadowpass/lanes.py; values above "
                        "1 compile with dynamic=True, which lanes need; smaller batches run whole)")
    p.add_argument("--routes", nargs="+", choices=("fused", "split"), default=["fused"],
                   help="decode_route values run side by side at each shadowkv batch: fused "
                        "(one opaque op per site) or split (Inductor's templates for the scores, "
                        "the key rebuild and the attention; the value fetch opaque)")
    p.add_argument("--check", action="store_true",
                   help="only check that the benchmarked path is the real one: full rank and "
                        "budget on a short context give dense's tokens")
    p.add_argument("--out", default=None, help="write results JSON (and a PNG plot) here")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing each run, profile this many decode steps and print GPU "
                        "time per part of the step (kernels grouped by name) and the GPU's idle "
                        "share")


@dataclass
class Row:
    method: str
    context: int
    batch: int
    tokens_per_s: float
    step_ms: float
    step_ms_spread: list[float]
    peak_gpu_gib: float
    pinned_gib: float = 0.0
    hit_rate: float | None = None
    roofline_ms: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def llama8b(layers: int, vocab: int = 128256, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model


def measure_peaks(timed_ms, device="cuda"):
    """(HBM device-to-device copy B/s counting read + write, pinned host-to-device copy B/s).

    timed_ms(fn) -> median milliseconds of fn; the kernel benchmark passes its own timer.
    """
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    hbm = 2 * n / (timed_ms(lambda: b.copy_(a)) * 1e-3)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h2d = n / (timed_ms(lambda: b.copy_(host, non_blocking=True)) * 1e-3)
    return hbm, h2d


def peaks() -> dict[str, float]:
    """HBM and pinned host-to-device GB/s, measured now."""
    from triton.testing import do_bench
    hbm, h2d = measure_peaks(lambda fn: do_bench(fn, rep=200))
    return {"hbm_gbs": hbm / 1e9, "h2d_gbs": h2d / 1e9}


def time_steps(step, n: int) -> tuple[list[float], list[float]]:
    """Per-step milliseconds of n calls (CUDA events, after the caller's warm-up), and the host
    milliseconds each call took to return (each step starts on an idle GPU, as when the caller
    needs the token: host work before the launch is GPU idle time)."""
    times, host = [], []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times, host


def summary(times: list[float]):
    t = sorted(times)
    return t[len(t) // 2], [t[len(t) // 5], t[(4 * len(t)) // 5]]


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------- dense
def dense_run(model, B: int, T: int, gen: int, profile: int = 0) -> Row:
    from transformers import StaticCache
    cfg = model.config
    H, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    torch.cuda.reset_peak_memory_stats()
    # room for the warm-up, timed and profiled steps (profile: twice, GPU and host)
    cache = StaticCache(config=cfg, max_cache_len=T + WARMUP_STEPS + gen + 2 * profile + 8)
    probe = torch.zeros(B, H, 1, d, dtype=torch.bfloat16, device="cuda")
    for layer in cache.layers:  # a decode step reads every cached byte, whatever the values
        layer.lazy_initialization(probe, probe)
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(T)
    forward = torch.compile(model.forward, mode="reduce-overhead")
    med, spread = decode_steps(forward, cache, model.config.vocab_size, B, T, gen, profile)
    return Row("dense", T, B, B * 1e3 / med, med, spread, torch.cuda.max_memory_allocated() / GIB)


def decode_steps(forward, cache, vocab: int, B: int, T: int, gen: int, profile: int = 0):
    """Median and p20-p80 milliseconds of `gen` greedy decode steps after the warm-up steps;
    then, with ``profile``, the GPU time of that many more steps per part (``step_profile``)."""
    ids = torch.randint(0, vocab, (B, 1), device="cuda")
    pos = torch.full((B, 1), T, device="cuda")

    cache_kw = cache_kwargs(forward, cache)  # once: the signature lookup is host time per step

    def step():
        nonlocal ids
        with torch.no_grad():
            out = forward(input_ids=ids, position_ids=pos, **cache_kw, use_cache=True,
                          logits_to_keep=1)
        ids = out.logits[:, -1:].argmax(-1)
        pos.add_(1)

    t0 = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    print(f"B={B}: {WARMUP_STEPS} warm-up steps (compiling) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    times, host = time_steps(step, gen)
    timed = summary(times)
    print(f"B={B}: step {timed[0]:.2f} ms; the host call to launch it {summary(host)[0]:.2f} ms "
          "(medians)", flush=True)
    if profile:
        print(f"B={B} T={T}: GPU time per decode step, {profile} steps profiled\n"
              + step_profile(step, profile), flush=True)
    return timed


# Kernel-name fragments -> part of the step (first match wins; names from templates/ and the
# kernels torch/Inductor launch for the rest of the model).
STEP_PARTS = (("value fetch (PCIe)", ("fetch_values",)),
              ("key rebuild", ("rebuild_keys", "reuse_plan")),
              ("landmark scores", ("landmark",)),
              ("top-k", ("topk", "sort", "radix")),
              ("sparse attention", ("sparse_decode", "flash", "attention", "fmha")),
              ("GEMM (weights)", ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas")),
              ("copies", ("copy", "memcpy", "memset", "fill")))


def step_profile(step, steps: int, device: str = "cuda") -> str:
    """GPU kernel time per part of the step (``STEP_PARTS``), per step, and the share of the
    wall time the GPU ran no kernel (launch gaps, host work, waits)."""
    from torch.profiler import ProfilerActivity, profile
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kind = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    sync()
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    parts: dict[str, float] = {}
    names: dict[str, float] = {}
    intervals = []
    for e in prof.events():
        if e.device_type != kind:
            continue
        us = e.time_range.end - e.time_range.start
        intervals.append((e.time_range.start, e.time_range.end))
        low = e.name.lower()
        part = next((p for p, keys in STEP_PARTS if any(k in low for k in keys)), "other")
        parts[part] = parts.get(part, 0.0) + us
        names[e.name] = names.get(e.name, 0.0) + us
    busy, end = 0.0, float("-inf")  # union of kernel intervals (streams overlap)
    for a, b in sorted(intervals):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    lines = [f"  {p:22s} {us / steps / 1e3:8.3f} ms" for p, us in
             sorted(parts.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'sum of kernels':22s} {sum(parts.values()) / steps / 1e3:8.3f} ms "
                 f"(busy {busy / steps / 1e3:.3f} ms of {wall_us / steps / 1e3:.3f} ms wall: "
                 f"GPU idle {1 - busy / wall_us:.0%})")
    lines.append("  top kernels:")
    lines += [f"    {us / steps / 1e3:8.3f} ms  {n[:100]}" for n, us in
              sorted(names.items(), key=lambda kv: -kv[1])[:15]]
    return "\n".join(lines) + "\n  host (Python) time of the same steps:\n" + host_profile(
        step, steps, sync)


def host_profile(step, steps: int, sync) -> str:
    """The host functions that take the most time (cProfile: own time, then cumulative)."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(25)
    return "\n".join("    " + line for line in out.getvalue().splitlines() if line.strip())


def release():
    """Drop compiled graphs (and the CUDA-graph pools and caches they hold) between runs."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def dense_max_batch(model, T: int, reserve: float) -> int:
    cfg = model.config
    per_seq = cfg.num_hidden_layers * T * 2 * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * 2
    free = torch.cuda.mem_get_info()[0] - reserve * GIB
    return max(1, int(free // per_seq))


# ------------------------------------------------------------------------------- shadowpass
def shadow_prefill(model, T: int, opts: dict, with_dense: bool = True):
    """One real prefill through the shadowkv backend: (session, cache, seconds, dense seconds).
    with_dense: also time the dense prefill (None when it runs out of memory or is not run)."""
    from transformers import DynamicCache

    import shadowpass
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    times = {"dense": None}
    paths = (("dense", {"min_sparse_len": 1 << 30}),) if with_dense else ()
    for path, extra in paths + (("shadowkv", {}),):
        torch._dynamo.reset()
        model.compile(backend="shadowkv", options={**opts, **extra})
        for _ in range(2):  # the first call compiles
            cache = DynamicCache(config=model.config)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    out = model(ids, **cache_kwargs(model, cache), logits_to_keep=1)
            except torch.OutOfMemoryError:  # HF's compiled dense prefill builds a [T, T] mask
                print(f"T={T}: {path} prefill: out of GPU memory", flush=True)
                times[path] = None
                del cache
                release()
                break
            torch.cuda.synchronize()
            times[path] = time.perf_counter() - t0
            del out
    session = shadowpass.runtime_of(model).session
    return session, cache, times["shadowkv"], times["dense"]


def tile_session(session, B: int):
    """The batch-1 session copied to B rows (real copies: each row owns its state)."""
    from .hostmem import pinned_empty
    from .reference import PrefillState
    from .runtime import Session, SiteState
    tables, sites = {}, {}
    for name, s in session.sites.items():
        def rows(t):
            if t.device.type == "cpu":
                out = pinned_empty((B,) + tuple(t.shape[1:]), t.dtype)
                out.copy_(t.expand(B, *t.shape[1:]))
                return out
            return t.expand(B, *t.shape[1:]).contiguous()
        key = s.cos.untyped_storage().data_ptr()
        if key not in tables:
            tables[key] = (rows(s.cos), rows(s.sin))
        cos, sin = tables[key]
        sites[name] = SiteState(
            prefill=PrefillState(*[rows(t) for t in s.prefill]), cos=cos, sin=sin,
            gen_k=rows(s.gen_k), gen_v=rows(s.gen_v), gen_len=s.gen_len.clone(),
            workspace=[rows(t) for t in s.workspace], selected=s.selected, used=s.used)
    return Session(sites, session.prompt_len)


def stub_cache(model, B: int, T: int):
    """A DynamicCache whose layers hold zero-stride stubs of [B, Hkv, T, d], as after prefill."""
    from transformers import DynamicCache
    cfg = model.config
    H, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    probe = torch.zeros(1, dtype=torch.bfloat16, device="cuda")
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
        layer.keys = probe.view(1, 1, 1, 1).expand(B, H, T, d)
        layer.values = probe.view(1, 1, 1, 1).expand(B, H, T, d)
    return cache


def shadow_roofline(model, B: int, T: int, cfg, hit: float, bw: dict[str, float]) -> float:
    """Milliseconds for the bytes a ShadowKV step must move: HBM and PCIe, overlapped."""
    m = model.config
    H, d, L = m.num_key_value_heads, m.hidden_size // m.num_attention_heads, m.num_hidden_layers
    C = cfg.chunk_size
    N = T // C - cfg.local_chunks
    K = min(cfg.budget_chunks, N)
    miss = K * (1 - hit)
    attended = K * C + cfg.outlier_chunks * C + cfg.local_chunks * C + 64
    per_layer_hbm = B * H * (N * d * 2                       # landmarks
                             + miss * C * (cfg.rank * 2 + d * 2 * 2)  # U rows read, K and V written
                             + attended * d * 2 * 2)        # keys and values attended
    per_layer_pcie = B * H * miss * C * d * 2
    hbm = (weight_bytes(model) + L * per_layer_hbm) / (bw["hbm_gbs"] * 1e6)
    pcie = L * per_layer_pcie / (bw["h2d_gbs"] * 1e6)
    return max(hbm, pcie)


def shadow_run(model, session, B: int, T: int, gen: int, cfg, bw, profile: int = 0) -> Row:
    import shadowpass
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tiled = tile_session(session, B)
    print(f"T={T} B={B}: state copied to {B} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    rt = shadowpass.runtime_of(model)
    rt.clear()
    cache = stub_cache(model, B, T)
    stubs = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    rt.attach(tiled, stubs)
    med, spread = decode_steps(model, cache, model.config.vocab_size, B, T, gen, profile)
    hit = tiled.hit_rate()
    row = Row("shadowkv", T, B, B * 1e3 / med, med, spread,
              torch.cuda.max_memory_allocated() / GIB, pinned_gib=tiled.nbytes("host") / GIB,
              hit_rate=hit)
    row.roofline_ms = shadow_roofline(model, B, T, cfg, hit or 0.0, bw)
    rt.clear()
    return row


def shadow_max_batch(model, session, reserve: float, host_fraction: float) -> int:
    from .hostmem import host_bytes_available
    gc.collect()
    torch.cuda.empty_cache()  # the prefill's cached activations are not free to mem_get_info
    gpu_per_seq = session.nbytes("device")
    host_per_seq = session.nbytes("host")
    free = torch.cuda.mem_get_info()[0] - reserve * GIB
    host_free = host_bytes_available()
    by_gpu = int(free // max(gpu_per_seq, 1))
    by_host = int(host_fraction * host_free // max(host_per_seq, 1))
    print(f"shadowkv batch limit: {by_gpu} by GPU ({gpu_per_seq / GIB:.2f} GiB/sequence), "
          f"{by_host} by host memory ({host_per_seq / GIB:.2f} GiB/sequence, "
          f"{host_free / GIB:.1f} GiB available)", flush=True)
    return max(1, min(by_gpu, by_host))


# ------------------------------------------------------------------------------------ check
def check_real_path(layers: int = 2) -> bool:
    """Full rank and budget on a short context: shadowpass's greedy tokens equal dense.

    In fp32: random weights give near-tied logits, which bf16 rounding of rebuilt keys can flip.
    """
    import shadowpass
    model = llama8b(layers, vocab=1024, dtype=torch.float32)
    ids = torch.randint(0, 1024, (2, 700), device="cuda")
    kw = {"max_new_tokens": 16, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        model.compile(backend="shadowkv", options={"rank": 1024, "budget": 1 << 16,
                                                       "min_sparse_len": 0, "outlier_chunks": 3})
        ours = model.generate(ids, **kw)
    ran = shadowpass.runtime_of(model) is not None
    same = torch.equal(dense, ours)
    print(f"real-path check (2 layers, 8B shape, 700 tokens, batch 2): tokens equal dense: {same}"
          f" (shadowkv state built: {ran})")
    torch._dynamo.reset()
    return same


def plot(rows: list[Row], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, T) in sorted({(r.method, r.context) for r in rows}):
        pts = sorted((r.batch, r.tokens_per_s) for r in rows if (r.method, r.context) == (method, T))
        ax.plot(*zip(*pts), marker="o", label=f"{method} {T // 1024}K")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def batch_sizes(args, largest: int) -> list[int]:
    """The --batches (default: 1) below the largest, and the largest that fits (capped by
    --max-batch)."""
    if args.max_batch:
        largest = min(largest, args.max_batch)
    extra = [1] if args.batches is None else args.batches
    return sorted({b for b in extra if b < largest} | {largest})


def shadow_side(model, T: int, opts: dict, cfg, bw, args) -> list[Row]:
    """Prefill one sequence through the backend, then decode at batch 1 and the largest batch."""
    rows = []
    with_dense = "dense" in args.methods  # its compile and run take minutes at 60K+
    session, cache, t_prefill, t_dense_prefill = shadow_prefill(model, T, opts, with_dense)
    dense = (f"{t_dense_prefill:.2f} s" if t_dense_prefill else "out of memory") if with_dense \
        else "not run (--methods)"
    # the two prefills differ in more than the state build (the dense path's HF causal mask is
    # [T, T]), so their difference is not the state's cost
    print(f"T={T}: prefill (1 sequence) dense {dense}, shadowkv {t_prefill:.2f} s "
          f"(with SVD, landmarks, outliers and the value offload)", flush=True)
    largest = shadow_max_batch(model, session, args.gpu_reserve_gib, args.host_fraction)
    # lanes need 2+ sequences each, and the backend runs a smaller batch whole
    runs = [(B, route, lanes) for B in batch_sizes(args, largest) for route in args.routes
            for lanes in (args.lanes if B >= 4 else [1])]
    for B, route, lanes in runs:
        if (route, lanes) != (opts.get("decode_route", "fused"), opts.get("decode_lanes", 1)):
            opts = {**opts, "decode_route": route, "decode_lanes": lanes}
            torch._dynamo.reset()  # a fresh decode graph, same prefill state
            # lanes run one graph on parts of the batch: its batch must be symbolic
            model.compile(backend="shadowkv", dynamic=True if lanes > 1 else None, options=opts)
        row = shadow_run(model, session, B, T, args.gen, cfg, bw, args.profile)
        gc.collect()
        row.extra.update(prefill_s=t_prefill, dense_prefill_s=t_dense_prefill, lanes=lanes,
                         route=route)
        labels = ([f"{lanes} lanes"] if lanes > 1 else []) + ([route] if route != "fused" else [])
        if labels:
            row.method = row.method.replace("shadowkv", f"shadowkv ({', '.join(labels)})", 1)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    del session, cache
    release()
    return rows


def dense_side(model, T: int, args) -> list[Row]:
    """Dense SDPA over a compiled static cache at batch 1 and the largest batch that fits (the
    memory estimate leaves out activations: where it does not fit, one sequence fewer)."""
    rows = []
    sizes = batch_sizes(args, dense_max_batch(model, T, args.gpu_reserve_gib))
    while sizes:
        B = sizes.pop(0)
        try:
            row = dense_run(model, B, T, args.gen, args.profile)
        except torch.OutOfMemoryError:
            release()
            smaller = not sizes and B > 1 and all(r.batch != B - 1 for r in rows)
            print(f"dense B={B} T={T}: out of GPU memory" + ("; trying B-1" if smaller else ""),
                  flush=True)
            if smaller:
                sizes.append(B - 1)
            continue
        release()
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    return rows


def run_bench(args) -> int:
    if not torch.cuda.is_available():
        print("shadowpass bench needs a CUDA GPU (it measures GPU decode throughput); "
              "on the CPU, run the tests instead.")
        return 2
    from .config import ShadowKVConfig
    torch.manual_seed(0)
    logging.basicConfig(format="%(message)s")  # the backend's reasons (e.g. why no lanes) show
    logging.getLogger("shadowpass").setLevel(logging.INFO)
    if args.check:
        return 0 if check_real_path() else 1
    bw = peaks()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}: HBM "
          f"{bw['hbm_gbs']:.0f} GB/s, pinned H2D {bw['h2d_gbs']:.1f} GB/s")
    model = llama8b(args.layers)
    cfg = ShadowKVConfig(rank=args.rank, budget=args.budget)
    opts = {"rank": args.rank, "budget": args.budget}
    rows: list[Row] = []
    for T in args.contexts:
        if "shadowkv" in args.methods:
            rows += shadow_side(model, T, opts, cfg, bw, args)
        if "dense" in args.methods:
            rows += dense_side(model, T, args)
    print_table(rows)
    if args.out:
        import os
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            json.dump({"peaks": bw, "rows": [asdict(r) for r in rows]}, f, indent=1)
        plot(rows, os.path.join(args.out, "e2e_tokens_per_s.png"))
    return 0


def print_table(rows: list[Row]):
    print("| context | method | batch | tokens/s | step ms (p20-p80) | peak GPU GiB | pinned GiB"
          " | hit rate | roofline ms | measured / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = f"{r.roofline_ms:.2f}" if r.roofline_ms else "-"
        frac = f"{r.step_ms / r.roofline_ms:.2f}x" if r.roofline_ms else "-"
        hit = f"{r.hit_rate:.0%}" if r.hit_rate is not None else "-"
        print(f"| {r.context} | {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {r.step_ms:.2f} "
              f"({r.step_ms_spread[0]:.2f}-{r.step_ms_spread[1]:.2f}) | {r.peak_gpu_gib:.1f} | "
              f"{r.pinned_gib:.1f} | {hit} | {bound} | {frac} |")
    for T in sorted({r.context for r in rows}):
        best = {m: max((r for r in rows if r.context == T and r.method.startswith(m)),
                       key=lambda r: r.tokens_per_s, default=None) for m in ("dense", "shadowkv")}
        if all(best.values()):
            print(f"T={T}: throughput gain at max batch {best['shadowkv'].tokens_per_s / best['dense'].tokens_per_s:.2f}x"
                  f" (batch {best['shadowkv'].batch} vs {best['dense'].batch})")
        one = {m: next((r for r in rows if r.context == T and r.method == m and r.batch == 1), None)
               for m in ("dense", "shadowkv")}
        if all(one.values()):
            print(f"T={T}: batch-1 latency dense {one['dense'].step_ms:.2f} ms, shadowkv "
                  f"{one['shadowkv'].step_ms:.2f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return run_bench(p.parse_args(argv))
