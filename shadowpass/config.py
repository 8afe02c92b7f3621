"""ShadowKVConfig: the knobs of the method, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .policies import POLICIES

DECODE_ROUTES = ("fused", "split")
LANDMARK_DTYPES = ("model", "float8_e4m3fn")

# field -> (smallest allowed, largest allowed or None)
_RANGES = {
    "rank": (1, None),
    "chunk_size": (1, 256),
    "budget": (1, None),
    "outlier_chunks": (0, None),
    "local_chunks": (0, None),
    "min_sparse_len": (0, None),
    "decode_lanes": (1, None),
    "chunk_cache": (1, 64),
}


@dataclass(frozen=True)
class ShadowKVConfig:
    """ShadowKV settings (defaults from Sun et al., 2024, arXiv 2410.21465).

    rank: rank of the pre-RoPE key SVD; capped per site at H_kv * head_dim.
    chunk_size: tokens per chunk (landmark granularity).
    budget: tokens of selected chunks attended per decode step (budget // chunk_size chunks).
    outlier_chunks: chunks per KV head kept exactly on the device (lowest min-cosine).
    local_chunks: trailing chunks of the prompt kept exactly (plus the incomplete tail).
    min_sparse_len: prompts shorter than this stay dense. None means
        budget + (outlier_chunks + local_chunks) * chunk_size; 0 forces ShadowKV everywhere.
    policy: how decode picks chunks: "shadowkv" (landmarks, the method), "shadowkv_hybrid"
        (landmarks, with Quest bounds on the KV heads that landmarks serve badly, picked at
        prefill from the prompt's last queries: more accurate, README "Accuracy"), or a
        baseline on the same machinery for accuracy comparisons: "quest", "streaming",
        "oracle" (see shadowpass/policies.py). CUDA runs the kernels for all but the last two.
    decode_route: how a decode step enters the compiled graph: "fused" (one opaque
        shadowkv::decode op per site; on CUDA its Triton kernels replay as one CUDA graph per
        site) or "split" (landmark scores, torch.topk, shadowkv::decode_plan, opaque: reuse
        plan and the value fetch from pinned host memory on a side stream, the key rebuild,
        then the attention; Inductor lowers the scores, the rebuild and the attention to our
        Triton templates on CUDA and fuses the attention with what follows; the CPU runs the
        reference either way).
    decode_lanes: a CUDA decode step runs its batch as this many sub-batches interleaved layer
        by layer, so one's value fetch crosses PCIe while another computes
        (``shadowpass/lanes.py``); 1 runs the batch whole. Needs a decode graph traced with a
        symbolic batch (compile with dynamic=True, or Dynamo's automatic dynamic after a second
        batch size) and at least 2 sequences per lane. 2 was 7-9% faster than 1 at the largest
        batches of 60K and 122K on an H100 (README, "Batch lanes"); 3 was slower.
    chunk_cache: a CUDA decode step keeps this many times the budget's chunks (rebuilt keys and
        values) on the GPU per KV head, so a chunk selected again after a few steps away is
        neither fetched over PCIe nor rebuilt; when a step's misses need room, the unselected
        chunks that score lowest go. 1 keeps only the last step's selection (the paper). It
        takes chunk_cache * budget * (key + value head dims) elements of GPU memory per KV
        head, sequence and site. Fused decode route only.
    landmark_dtype: how the landmarks are stored: "model" (the keys' dtype, as the paper) or
        "float8_e4m3fn" (a plain cast, no scale: half the bytes that every decode step's
        landmark scores read, the largest part of a long-context step, and half the
        landmarks' GPU memory). Selection changes a little: on SmolLM2 at budget 256 it picks
        93% of the chunks that fp32 landmarks pick, and they hold 50.77% of the exact
        attention mass against 50.99% (scripts/landmark_precision.py). Policy "shadowkv" only.
    """

    rank: int = 160
    chunk_size: int = 8
    budget: int = 2048
    outlier_chunks: int = 48
    local_chunks: int = 4
    min_sparse_len: Optional[int] = None
    policy: str = "shadowkv"
    decode_route: str = "fused"
    decode_lanes: int = 1
    chunk_cache: int = 1
    landmark_dtype: str = "model"

    def __post_init__(self):
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if name == "min_sparse_len" and value is None:
                continue
            allowed = f"an int >= {lo}" + (f" and <= {hi}" if hi is not None else "")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ShadowKVConfig.{name}={value!r}: must be {allowed}")
            if value < lo or (hi is not None and value > hi):
                raise ValueError(f"ShadowKVConfig.{name}={value!r} is out of range: must be {allowed}")
        if self.decode_route not in DECODE_ROUTES:
            raise ValueError(f"ShadowKVConfig.decode_route={self.decode_route!r}: must be one of "
                             f"{DECODE_ROUTES}")
        if self.chunk_cache > 1 and self.decode_route != "fused":
            raise ValueError(f"ShadowKVConfig.chunk_cache={self.chunk_cache} needs "
                             f"decode_route='fused' (the split route's attention reads one "
                             f"slot per selected chunk); use chunk_cache=1 with "
                             f"decode_route={self.decode_route!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"ShadowKVConfig.policy={self.policy!r}: must be one of {POLICIES}")
        if self.landmark_dtype not in LANDMARK_DTYPES:
            raise ValueError(f"ShadowKVConfig.landmark_dtype={self.landmark_dtype!r}: must be one "
                             f"of {LANDMARK_DTYPES}")
        if self.landmark_dtype != "model" and self.policy != "shadowkv":
            raise ValueError(f"ShadowKVConfig.landmark_dtype={self.landmark_dtype!r} needs "
                             f"policy='shadowkv' (policy {self.policy!r} keeps its landmarks or "
                             f"bounds in the model's dtype); use landmark_dtype='model'")
        if self.budget < self.chunk_size:
            raise ValueError(
                f"ShadowKVConfig.budget={self.budget} is smaller than chunk_size={self.chunk_size}: "
                f"the budget must hold at least one chunk (budget >= {self.chunk_size})")

    @property
    def budget_chunks(self) -> int:
        return self.budget // self.chunk_size

    @property
    def sparse_threshold(self) -> int:
        if self.min_sparse_len is not None:
            return self.min_sparse_len
        return self.budget + (self.outlier_chunks + self.local_chunks) * self.chunk_size

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None,
                     base: Optional["ShadowKVConfig"] = None) -> "ShadowKVConfig":
        """Build a config from torch.compile(options=...); unknown keys are errors."""
        options = dict(options or {})
        if "config" in options:
            cfg = options.pop("config")
            if not isinstance(cfg, ShadowKVConfig):
                raise ValueError(f"option 'config' must be a ShadowKVConfig, got {type(cfg).__name__}")
            base = cfg
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown shadowkv option(s) {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(base or cls(), **options)
