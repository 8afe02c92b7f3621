"""Run methods (dense, ShadowKV at several budgets and ranks, baseline selection policies) on
the same prompts with ordinary HF ``generate`` and score them.

The model is compiled once, in place, with :class:`SwitchBackend`: Dynamo traces the model
once per shape, and each traced graph is rewritten lazily per ShadowKV config, so moving to the
next method or budget costs one rewrite instead of a fresh trace of 30 layers. ``config=None``
runs the captured graph unmodified (dense attention, the plain model).

Methods (all but ``dense`` use ``min_sparse_len=0`` so the sparse path really runs; whether it
ran is recorded per batch from ``shadowpass.runtime_of(model).built``):

===================== ======== ============= ============== =================================
name                  policy   rank          outlier chunks what it shows
===================== ======== ============= ============== =================================
dense                 -        -             -              the plain model
shadowkv              shadowkv ``--ranks``   scaled budget  the method
shadowkv_no_outliers  shadowkv ``--ranks``   0              the outlier ablation
shadowkv_fp8          shadowkv ``--ranks``   scaled budget  the method with fp8 landmarks
                                                            (``landmark_dtype``)
shadowkv_hybrid       shadowkv ``--ranks``   scaled budget  + Quest bounds on heads that
                      _hybrid                               landmarks serve badly (prefill)
quest                 quest    H_kv*d (full) 0              Quest's bound, exact keys
streaming             streaming H_kv*d       0              sinks + recent window
oracle                oracle   H_kv*d        0              exact top-k attention mass
===================== ======== ============= ============== =================================

Every method also keeps the local window (``local_chunks``) and generated tokens exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import ShadowKVConfig
from ..rewrite import rewrite
from ..runtime import ShadowGraph, runtime_of
from . import scoring
from .tasks import Sample

log = logging.getLogger(__name__)

METHODS = ("dense", "shadowkv", "shadowkv_no_outliers", "shadowkv_fp8", "shadowkv_hybrid", "quest",
           "streaming", "oracle")
_POLICY = {"shadowkv": "shadowkv", "shadowkv_no_outliers": "shadowkv", "shadowkv_fp8": "shadowkv",
           "shadowkv_hybrid": "shadowkv_hybrid", "quest": "quest", "streaming": "streaming",
           "oracle": "oracle"}


def default_rank(kv_width: int) -> int:
    """The paper's rank scaled to the model: 160 of H_kv*d = 1024 is 5/32 (30 for SmolLM2)."""
    return max(1, min(kv_width, round(kv_width * 5 / 32)))


def default_outlier_chunks(budget: int, chunk_size: int = 8) -> int:
    """Outlier chunks scaled with the budget as in the reference's batched code,
    (budget // 1024) * 24 chunks of 8, i.e. 18.75% of the budget in tokens (48 chunks at
    budget 2048), but continuous and at least one chunk (the attention sink): 2 chunks at
    budget 64, 6 at 256, 24 at 1024. The paper's fixed 48 chunks (384 tokens) would be a third
    of a 1K prompt."""
    return max(1, round(budget * 0.1875 / chunk_size))


@dataclass(frozen=True)
class Method:
    """One column of the results: a method at a budget and rank (None for dense)."""

    name: str
    budget: Optional[int] = None
    rank: Optional[int] = None
    outlier_chunks: Optional[int] = None

    @property
    def label(self) -> str:
        if self.name == "dense":
            return "dense"
        return f"{self.name}/b{self.budget}/r{self.rank}"

    def config(self, chunk_size: int = 8, local_chunks: int = 4) -> Optional[ShadowKVConfig]:
        if self.name == "dense":
            return None
        return ShadowKVConfig(rank=self.rank, chunk_size=chunk_size, budget=self.budget,
                              outlier_chunks=self.outlier_chunks, local_chunks=local_chunks,
                              min_sparse_len=0, policy=_POLICY[self.name],
                              landmark_dtype="float8_e4m3fn" if self.name == "shadowkv_fp8"
                              else "model")

    def attended_prompt_tokens(self, chunk_size: int = 8, local_chunks: int = 4) -> Optional[int]:
        """Prompt tokens a decode step attends to (at most): selected + outliers + local."""
        if self.name == "dense":
            return None
        return self.budget + (self.outlier_chunks + local_chunks) * chunk_size


def build_methods(names: Sequence[str], budgets: Sequence[int], ranks: Sequence[Optional[int]],
                  kv_width: int, chunk_size: int = 8,
                  outlier_chunks: Optional[int] = None) -> List[Method]:
    """Methods x budgets (x ranks for the ShadowKV variants; baselines use full rank)."""
    out = []
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
        if name == "dense":
            out.append(Method("dense"))
            continue
        for budget in budgets:
            if name.startswith("shadowkv"):
                for r in ranks:
                    r = min(r or default_rank(kv_width), kv_width)
                    o = 0 if name == "shadowkv_no_outliers" else (
                        default_outlier_chunks(budget, chunk_size) if outlier_chunks is None
                        else outlier_chunks)
                    out.append(Method(name, budget, r, o))
            else:
                out.append(Method(name, budget, kv_width, 0))
    return list(dict.fromkeys(out))  # drop duplicates, keep order


def _eager(gm, example_inputs, **_):
    return gm.forward


class SwitchBackend:
    """A torch.compile backend whose ShadowKV config can change between calls.

    ``backend.config = cfg`` selects the config of the next calls (None: dense). Each graph
    Dynamo captures is rewritten once per config, on first use. ``inner`` compiles the
    (rewritten) graphs: "eager" runs them as traced (fast to build; the reference ops are plain
    PyTorch anyway), "inductor" as ``shadowpass.compile`` would.
    """

    def __init__(self, inner: str = "eager"):
        if inner == "eager":
            self.inner: Callable = _eager
        elif inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            self.inner = functools.partial(compile_fx, config_patches={})
        else:
            raise ValueError(f"inner compiler {inner!r}: choose 'eager' or 'inductor'")
        self.config: Optional[ShadowKVConfig] = None

    def __call__(self, gm, example_inputs, **_):
        return _Switch(self, gm, list(example_inputs))


class _TracedShadowGraph(ShadowGraph):
    """ShadowGraph for the eager inner compiler: runs the captured and the rewritten graphs as
    traced, without ShadowGraph's nested torch.compile (which only pays off with Inductor and
    costs a Dynamo trace of every rewritten graph per config)."""

    def dense(self, *args):
        return self.original(*args)

    def sparse(self, *args):
        return self.rw.gm(*args)


class _Switch:
    def __init__(self, owner: SwitchBackend, gm, example_inputs):
        self.owner, self.gm, self.example_inputs = owner, gm, example_inputs
        self.graphs: Dict[Optional[ShadowKVConfig], Callable] = {}

    def __call__(self, *args):
        cfg = self.owner.config
        fn = self.graphs.get(cfg)
        if fn is None:
            rw = rewrite(self.gm, cfg) if cfg is not None else None
            if rw is None or rw.phase is None:
                fn = self.gm.forward if self.owner.inner is _eager else torch.compile(
                    self.gm, backend=self.owner.inner)
            else:
                cls = _TracedShadowGraph if self.owner.inner is _eager else ShadowGraph
                fn = cls(self.gm, rw, self.example_inputs, cfg, self.owner.inner)
            self.graphs[cfg] = fn
        return fn(*args)


@dataclass
class Output:
    """One sample under one method."""

    sample: int               # index into the sample list
    method: str               # Method.label
    prediction: str
    tokens: List[int]         # generated ids up to and including EOS
    score: float              # RULER string match, 0..1
    exact_agree: Optional[bool] = None   # greedy tokens identical to dense's
    token_agree: Optional[float] = None  # fraction of dense's tokens before divergence
    sparse_ran: Optional[bool] = None    # ShadowKV state existed after generate (batch-level)
    seconds: float = 0.0                 # wall time of the batch / batch size


def pad_left(rows: Sequence[Sequence[int]], width: int, pad_id: int, device):
    """Left-pad token rows to ``width``: ids [B, width] int64, attention mask [B, width]."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"prompt of {len(r)} tokens is longer than the batch width {width}")
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def trim(tokens: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


class Harness:
    """Run every method on the same samples, batched by prompt length.

    Parameters
    ----------
    model : an HF causal LM (eval mode); compiled in place with a :class:`SwitchBackend`.
    tokenizer : its tokenizer (``pad_token_id`` and ``eos_token_id`` are used).
    batch_size : prompts per generate call. Prompts of one length are left-padded to exactly
        that length and the last batch is filled with repeats (discarded), so every batch has
        one shape and Dynamo traces few graphs.
    inner : "eager" or "inductor", see :class:`SwitchBackend`.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, inner: str = "eager",
                 chunk_size: int = 8, local_chunks: int = 4):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.chunk_size, self.local_chunks = batch_size, chunk_size, local_chunks
        self.backend = SwitchBackend(inner)
        model.compile(backend=self.backend)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = sorted({int(e) for e in eos if e is not None} |
                              ({int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None
                               else set()))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def batches(self, samples: Sequence[Sample]):
        """Index lists of samples with equal requested length, batch_size each."""
        by_len: Dict[int, List[int]] = {}
        for i, s in enumerate(samples):
            by_len.setdefault(s.length, []).append(i)
        for length, idx in by_len.items():
            for j in range(0, len(idx), self.batch_size):
                yield length, idx[j:j + self.batch_size]

    @torch.no_grad()
    def generate(self, method: Method, samples: Sequence[Sample], idx: List[int], width: int):
        """Greedy outputs of one batch under one method: (token lists, sparse_ran, seconds)."""
        self.backend.config = method.config(self.chunk_size, self.local_chunks)
        rows = [samples[i].input_ids for i in idx]
        rows += [rows[-1]] * (self.batch_size - len(rows))  # one shape for every batch
        ids, mask = pad_left(rows, width, self.pad_id, self.model.device)
        n_new = max(samples[i].max_new_tokens for i in idx)
        rt = runtime_of(self.model)
        if rt is not None:
            rt.clear()  # nothing may leak from the previous batch into the check below
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=0,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        seconds = time.perf_counter() - start
        rt = runtime_of(self.model)
        sparse_ran = None if method.name == "dense" else bool(rt is not None and rt.built)
        new = out[:len(idx), width:].tolist()
        return [trim(t, self.eos_ids) for t in new], sparse_ran, seconds / len(idx)

    def run(self, samples: Sequence[Sample], methods: Sequence[Method],
            progress: Optional[Callable[[int, str, int, float], None]] = None,
            sink: Optional[Callable[[Output], None]] = None) -> List[Output]:
        """All methods on all samples. Dense (if listed) runs first in each batch so the others
        can be compared with it. ``sink(output)`` gets each output as soon as its batch is done,
        then ``progress(n, label, length, seconds)`` is called with the number of samples done
        and the batch's wall time."""
        methods = sorted(methods, key=lambda m: m.name != "dense")
        outputs: List[Output] = []
        try:
            with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
                for length, idx in self.batches(samples):
                    width = max(length, max(len(samples[i].input_ids) for i in idx))
                    dense_tokens = None
                    for m in methods:
                        toks, ran, sec = self.generate(m, samples, idx, width)
                        if m.name == "dense":
                            dense_tokens = toks
                        for j, (i, t) in enumerate(zip(idx, toks)):
                            pred = self.tok.decode(t, skip_special_tokens=True)
                            o = Output(sample=i, method=m.label, prediction=pred, tokens=t,
                                       score=scoring.string_match_all(pred, samples[i].answers),
                                       sparse_ran=ran, seconds=sec)
                            if dense_tokens is not None:
                                o.exact_agree = scoring.exact_agreement(t, dense_tokens[j])
                                o.token_agree = scoring.token_agreement(t, dense_tokens[j])
                            outputs.append(o)
                            if sink is not None:
                                sink(o)
                        if ran is False:
                            log.warning("%s: the sparse path did not run at length %d", m.label,
                                        length)
                        if progress is not None:
                            progress(len(idx), m.label, length, sec * len(idx))
        finally:
            self.backend.config = None
        return outputs


def summarize(samples: Sequence[Sample], outputs: Sequence[Output],
              methods: Sequence[Method]) -> List[dict]:
    """Per (task, haystack, method, length) and per (..., depth): RULER score (0..100),
    exact agreement with dense (0..1), mean token agreement, and the fraction of batches on
    which the sparse path ran."""
    info = {m.label: m for m in methods}
    groups: Dict[tuple, List[Output]] = {}
    for o in outputs:
        s = samples[o.sample]
        for depth in (None, s.depth):
            groups.setdefault((s.task, s.haystack, o.method, s.length, depth), []).append(o)
    rows = []
    order = {m.label: i for i, m in enumerate(methods)}
    for (task, hay, label, length, depth), os_ in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], order.get(kv[0][2], -1),
                                            -1.0 if kv[0][4] is None else kv[0][4])):
        m = info.get(label, Method("dense"))
        agree = [o.exact_agree for o in os_ if o.exact_agree is not None]
        tok = [o.token_agree for o in os_ if o.token_agree is not None]
        ran = [o.sparse_ran for o in os_ if o.sparse_ran is not None]
        rows.append(dict(
            task=task, haystack=hay, method=m.name, label=label, budget=m.budget, rank=m.rank,
            outlier_chunks=m.outlier_chunks, length=length, depth=depth, n=len(os_),
            score=100.0 * scoring.mean(o.score for o in os_),
            exact_agreement=scoring.mean(agree) if label != "dense" else None,
            token_agreement=scoring.mean(tok) if label != "dense" else None,
            sparse_ran=scoring.mean(ran) if ran else None,
            seconds_per_sample=scoring.mean(o.seconds for o in os_)))
    return rows


def method_json(m: Method, chunk_size: int = 8, local_chunks: int = 4) -> dict:
    cfg = m.config(chunk_size, local_chunks)
    return dict(label=m.label, name=m.name, budget=m.budget, rank=m.rank,
                outlier_chunks=m.outlier_chunks,
                attended_prompt_tokens=m.attended_prompt_tokens(chunk_size, local_chunks),
                config=dataclasses.asdict(cfg) if cfg is not None else None)
