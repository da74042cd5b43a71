"""Dotted config keys and arm ids: setting ``a.b.c`` in a dict, and grid values as file-name fragments."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ablations.config.base import ConfigError


def canon(value: Any) -> str:
    """A grid value as canonical JSON, so equal values compare equal whatever their key order."""
    return json.dumps(value, sort_keys=True, default=str)


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets ``raw[a][b][c] = value`` for ``a.b.c``; a mapping value is merged into an existing section, so a
    grid axis can bundle settings (``model: [{arch: plain_mlp}, {arch: resnet_mlp, branch_scale: 0.5}]``)."""
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
        node = nxt
    old = node.get(parts[-1])
    node[parts[-1]] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def short_keys(keys: list[str]) -> dict[str, str]:
    """Id prefixes for grid keys: the last component unless ambiguous, as a safe file-name fragment."""
    last = [k.split(".")[-1] for k in keys]
    return {k: _safe_key(s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe_key(key: str) -> str:
    # Ids are folder names: a key never contributes a path separator, a leading dot or anything to quote.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.") or "_"


def value_label(value: Any) -> str:
    """Short text for a grid value: a bundle (mapping) shows its values joined by '+'."""
    if isinstance(value, dict):
        return "+".join(value_label(v) for v in value.values())
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def slug(value: Any) -> str:
    """A grid value as a file-name fragment (``[A-Za-z0-9._+-]``)."""
    text = value_label(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "_"


def digest(text: str) -> str:
    """Eight hex digits of SHA-1: a stable suffix that keeps ids unique."""
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def limit(arm_id: str, n: int = 120) -> str:
    """``arm_id`` cut to ``n`` characters, with a digest of the whole so cut ids stay distinct."""
    # Well below the 255-byte limit of a file name (ids are ASCII), leaving room for temp-file prefixes.
    return arm_id if len(arm_id) <= n else arm_id[: n - 9] + "~" + digest(arm_id)
