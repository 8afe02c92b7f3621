"""Inductor lowerings for the ShadowKV ops (installed as ``shadowpass.lowering``).

Importing this package (``import shadowpass`` does) registers them:

- ``shadowkv::sparse_attention`` -> two Triton templates (``templates/sparse_attention*.jinja``:
  flash-decoding split kernel, autotuned, and the merge, into which Inductor fuses the
  consumer's epilogue); see ``sparse_attention.py``. Registered only where
  ``compat.TEMPLATE_ROUTE`` holds (Triton present, an Inductor whose template API these calls
  were checked against); used per call on devices Inductor emits Triton for, so the CPU keeps
  the reference op.

``compat`` is the one module that touches Inductor internals and knows the version differences.
The other ShadowKV ops stay opaque custom ops.
"""
from __future__ import annotations

import logging

from . import compat

REGISTERED: list[str] = []

if compat.TEMPLATE_ROUTE:
    try:
        from . import sparse_attention

        if sparse_attention.register():
            REGISTERED.append("shadowkv::sparse_attention")
    except Exception as e:  # importing shadowpass must not fail for a lowering
        logging.getLogger("shadowpass").warning(
            "shadowpass: the Inductor lowering of shadowkv::sparse_attention is not registered "
            "(%s: %s); the op runs as an opaque kernel", type(e).__name__, e)

__all__ = ["REGISTERED", "compat"]
