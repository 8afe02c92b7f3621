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
