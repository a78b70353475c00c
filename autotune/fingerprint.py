"""What identifies a model for ``layers="auto"``: a hash of its configuration that is the same in every process.

`config_hash` takes an HF ``PretrainedConfig`` (its ``to_dict()``), a mapping, a dataclass or a plain object
(its attributes), without the keys in `VOLATILE` (where the weights came from, library versions, the dtype, how
attention is dispatched, output switches: none changes what a site computes). Weights do not enter it.

A value is hashed by its content: JSON scalars as they are, mappings, sequences and sets (sorted) element by
element, nested configs, dataclasses and plain objects by their fields, enums, dtypes and devices by name, and
other objects by their ``repr`` when it holds no memory address. Anything else would hash differently in every
process, so no calibration could ever match it: `UnstableConfig` says which field, and the backend then treats
the model as uncalibrated (one warning, then every site, as ``layers="all"``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import Mapping

import torch

VOLATILE = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_attn_implementation_autoset",
        "architectures",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "torchscript",
        "use_return_dict",
        "_experts_implementation",
    }
)
MAX_DEPTH = 20
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]{6,}\b")


class UnstableConfig(ValueError):
    """A configuration (or a value inside it) with no content that is the same in every process."""


def _fields(config, where: str) -> Mapping:
    """The top level of a configuration as a mapping, or `UnstableConfig`."""
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        try:
            body = to_dict()
        except Exception as e:  # noqa: BLE001 - any failure of foreign code: refuse, with its message
            raise UnstableConfig(
                f"{where}.to_dict() raised {type(e).__name__}: {' '.join(str(e).split())[:120]}"
            ) from None
        if not isinstance(body, Mapping):
            raise UnstableConfig(f"{where}.to_dict() returned a {type(body).__name__}, not a mapping")
        return body
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, (str, bytes, int, float, bool, list, tuple, set, frozenset, type)) or config is None:
        raise UnstableConfig(
            f"{where} is of type {type(config).__name__}, not a configuration (a mapping, a dataclass, an object "
            f"with attributes, or a PretrainedConfig)"
        )
    attrs = getattr(config, "__dict__", None)
    if not isinstance(attrs, dict):
        raise UnstableConfig(f"{where} (a {type(config).__name__}) has neither to_dict() nor attributes to hash")
    return attrs


def _plain(value, where: str, depth: int):
    """A JSON form of ``value`` that depends on its content only."""
    if depth > MAX_DEPTH:
        raise UnstableConfig(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_plain(v, f"{where}{{}}", depth + 1) for v in value]
        return sorted(items, key=lambda x: json.dumps(x, sort_keys=True))
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    structured = (
        isinstance(value, Mapping)
        or callable(getattr(value, "to_dict", None))
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
    )
    if not structured and type(value).__repr__ is not object.__repr__:
        text = repr(value)
        if not _ADDRESS.search(text):
            return f"{type(value).__qualname__}:{text}"
    if structured or isinstance(getattr(value, "__dict__", None), dict):
        body = _fields(value, where)
        out = {str(k): _plain(v, f"{where}.{k}", depth + 1) for k, v in body.items() if str(k) not in VOLATILE}
        return out if isinstance(value, Mapping) else {"__class__": type(value).__qualname__, **out}
    raise UnstableConfig(f"{where} holds a {type(value).__qualname__} whose only text form is its memory address")


def config_hash(config) -> str:
    """A 20-hex-digit hash of a model's configuration (see the module docstring); `UnstableConfig` if it has
    no stable content."""
    body = {str(k): _plain(v, f"config.{k}", 1) for k, v in _fields(config, "config").items() if str(k) not in VOLATILE}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def fingerprint(config_hash_: str, num_sites: int) -> str:
    """A model's fingerprint from its `config_hash` and its number of attention sites per forward."""
    return hashlib.sha256(f"{config_hash_}|sites={int(num_sites)}".encode()).hexdigest()[:20]


def model_fingerprint(config, num_sites: int) -> str:
    """What identifies a calibration's model: `config_hash` of its configuration and its number of attention
    sites per forward."""
    return fingerprint(config_hash(config), num_sites)
