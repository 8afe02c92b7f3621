"""Hugging Face call conventions that differ across transformers 5.x.

A model's forward takes its KV cache as ``cache`` in newer releases (5.24 here), which deprecate
``past_key_values`` (removal announced for 5.40); older ones (5.17 on the GPU machine) know only
``past_key_values``. Outputs carry the cache under the same name.
"""
from __future__ import annotations

import inspect

import torch


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)``, under the name its forward takes (``model`` is a
    module or its compiled ``forward``)."""
    params = inspect.signature(getattr(model, "forward", model)).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward returned (``out.cache`` or, before the rename, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def edit_with_sessions():
    """Let HF's cache edits reach ShadowKV state (once per process, when transformers is in use).

    A cache layer holding stubs names the session they stand for. Beam search's
    ``reorder_cache(beam_idx)`` would ``index_select`` the stubs into full-size zeros and drop
    the session: the session's rows are reordered instead (in place) and the stubs stay.
    ``crop`` (assisted and prompt-lookup decoding drop rejected candidates) slices the stubs,
    which stay zero-stride: the session is cut to the new length and the new stubs name it.
    ``update`` run eagerly on stubs (the compiled forward was bypassed) raises instead of
    attending to zeros.
    """
    import sys
    # DynamicLayer holds the cat cache, so the stubs
    cls = getattr(sys.modules.get("transformers.cache_utils"), "DynamicLayer", None)
    if cls is None or getattr(cls.crop, "_shadowkv", False):
        return
    reorder, crop, update = cls.reorder_cache, cls.crop, cls.update

    def session_of(layer):
        return getattr(getattr(layer, "keys", None), "_shadowkv_session", None)

    def reorder_cache(self, beam_idx):
        session = session_of(self)
        if session is None:
            return reorder(self, beam_idx)
        session.reorder(beam_idx)

    def crop_(self, *args, **kwargs):
        session = session_of(self)
        crop(self, *args, **kwargs)
        if session is not None:
            session.truncate(self.keys.shape[-2])
            self.keys._shadowkv_session = self.values._shadowkv_session = session

    def update_(self, *args, **kwargs):
        # traced, this is the compiled step (the branch folds away); run, the model went eager
        if not torch.compiler.is_compiling() and session_of(self) is not None:
            raise RuntimeError(EAGER_ON_STUBS)
        return update(self, *args, **kwargs)

    for fn in (reorder_cache, crop_, update_):
        fn._shadowkv = True
    cls.reorder_cache, cls.crop, cls.update = reorder_cache, crop_, update_


EAGER_ON_STUBS = (
    "shadowkv: the model ran eagerly on a cache that holds ShadowKV stubs, so its attention would "
    "read zeros. Usually Dynamo hit its recompile limit for the model's forward (TORCH_LOGS="
    "recompiles shows the guards) and fell back to eager: compile with dynamic=True, or raise "
    "torch._dynamo.config.recompile_limit. Or the cache was passed to an uncompiled model.")
