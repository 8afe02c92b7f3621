"""Hugging Face call conventions that differ across transformers 5.x.

A model's forward takes its KV cache as ``cache`` in newer releases (5.24 here), which deprecate
``past_key_values`` (removal announced for 5.40); older ones (5.17 on the GPU machine) know only
``past_key_values``. Outputs carry the cache under the same name.
"""
from __future__ import annotations

import inspect


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)``, under the name its forward takes (``model`` is a
    module or its compiled ``forward``)."""
    params = inspect.signature(getattr(model, "forward", model)).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward returned (``out.cache`` or, before the rename, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def reorder_with_sessions():
    """Let HF beam search reorder ShadowKV state (once per process, when transformers is in use).

    Beam search calls each cache layer's ``reorder_cache(beam_idx)``, whose ``index_select`` on
    a zero-stride stub would build a full-size tensor of zeros and drop the session the stub
    names. For a layer holding stubs, the session's rows are reordered instead (in place) and
    the stubs stay.
    """
    import sys
    cache_utils = sys.modules.get("transformers.cache_utils")
    layer = getattr(cache_utils, "CacheLayerMixin", None)
    if layer is None or getattr(layer.reorder_cache, "_shadowkv", False):
        return
    original = layer.reorder_cache

    def reorder_cache(self, beam_idx):
        session = getattr(getattr(self, "keys", None), "_shadowkv_session", None)
        if session is None:
            return original(self, beam_idx)
        session.reorder(beam_idx)

    reorder_cache._shadowkv = True
    layer.reorder_cache = reorder_cache
