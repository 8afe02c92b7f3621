"""Triton kernels for the ShadowKV ops (installed as ``shadowpass.templates``).

Each module opens with a sub-notation block and holds the kernels plus thin launch wrappers;
none imports Inductor. The decode step that composes them is ``shadowpass.kernels``.

- ``landmark_scores``: chunk scores (softmax over chunks, max over the GQA group) and top-k.
- ``chunk_gather``: cache-hit reuse plan, key rebuild (U @ SV with RoPE), value fetch (host).
- ``sparse_decode``: split-K attention over [outliers | selected | local | generated].
- ``chunk_landmarks``: prefill landmarks and min-cosine outlier scores.
- ``sparse_attention`` (+ ``sparse_attention*.py.jinja``): the same attention as Inductor
  templates (Jinja sources, autotuning configs); ``shadowpass.lowering`` registers them.
"""
