"""Inductor lowerings for the ShadowKV ops (installed as ``shadowpass.lowering``).

Importing this package (``import shadowpass`` does) registers them:

- ``shadowkv::sparse_attention`` -> two Triton templates (``templates/sparse_attention*.jinja``:
  flash-decoding split kernel, autotuned, and the merge, into which Inductor fuses the
  consumer's epilogue); see ``sparse_attention.py``.
- ``shadowkv::landmark_scores`` -> two Triton templates (``templates/landmark_*.jinja``: the
  logits with per-block softmax statistics, then the scores that ``torch.topk`` reads); see
  ``landmark_scores.py``.
- ``shadowkv::rebuild_keys`` -> one Triton template (``templates/key_rebuild.py.jinja``) that
  rebuilds the missed chunks' keys into the selected-K workspace in place; see
  ``key_rebuild.py``.

Registered only where ``compat.TEMPLATE_ROUTE`` holds (Triton present, an Inductor whose
template API these calls were checked against); used per call on devices Inductor emits Triton
for, so the CPU keeps the reference ops. ``compat`` is the one module that touches Inductor
internals and knows the version differences. The other ShadowKV ops stay opaque custom ops:
``decode_plan`` (reuse plan, and the value fetch from pinned host memory started on a side
stream, which Inductor's generated code cannot express), ``fetch_wait`` and the prefill ops.
"""
from __future__ import annotations

import importlib
import logging

from . import compat

REGISTERED: list[str] = []

if compat.TEMPLATE_ROUTE:
    for module, op in (("sparse_attention", "shadowkv::sparse_attention"),
                       ("landmark_scores", "shadowkv::landmark_scores"),
                       ("key_rebuild", "shadowkv::rebuild_keys")):
        try:
            if importlib.import_module(f"{__name__}.{module}").register():
                REGISTERED.append(op)
        except Exception as e:  # importing shadowpass must not fail for a lowering
            logging.getLogger("shadowpass").warning(
                "shadowpass: the Inductor lowering of %s is not registered (%s: %s); the op runs "
                "as an opaque kernel", op, type(e).__name__, e)

__all__ = ["REGISTERED", "compat"]
