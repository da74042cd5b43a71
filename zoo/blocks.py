"""Block tagging: how the probe finds the repeated blocks of any zoo model, in depth order.

Convention (ARCHITECTURE.md section 2): every layer of repeated block ``i`` is named ``block_<i>_<part>``
(zero-padded index). ``<part> == "linear"`` is the block's first linear layer: its output is the
pre-activation whose gradient dL/dz the probe records. ``<part> == "act"`` is the block's first activation
layer, whose input/output give the saturation statistics. Layers named ``stem_*`` and ``head_*`` sit
before and after the blocks (depth -1). Names survive ``.keras`` round trips, so a reloaded model is probed
the same way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

_BLOCK_RE = re.compile(r"^block_(\d+)_(.+)$")


def block_name(index: int, part: str, depth: int = 1000) -> str:
    """Returns the tagged layer name for ``part`` of block ``index`` (padding fits ``depth``)."""
    return f"block_{index:0{max(3, len(str(max(depth - 1, 0))))}d}_{part}"


@dataclasses.dataclass(frozen=True)
class Block:
    """One repeated block of a model.

    Attributes:
        index: depth position, 0 nearest the input.
        prefix: the shared name prefix, e.g. ``block_007``.
        layers: the block's top-level layers by part name (``linear``, ``act``, ...).
    """

    index: int
    prefix: str
    layers: dict

    @property
    def linear(self) -> keras.layers.Layer | None:
        return self.layers.get("linear")

    @property
    def act(self) -> keras.layers.Layer | None:
        return self.layers.get("act")


def parse_layer_name(name: str) -> tuple[int, str] | None:
    """Returns ``(block index, part)`` for a tagged layer name, else ``None``."""
    m = _BLOCK_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_role(name: str) -> tuple[str, int]:
    """Returns ``(role, depth)``: ``("block", i)``, ``("stem", -1)``, ``("head", -1)`` or ``("other", -1)``."""
    parsed = parse_layer_name(name)
    if parsed:
        return "block", parsed[0]
    for role in ("stem", "head"):
        if name.startswith(role + "_"):
            return role, -1
    return "other", -1


def blocks(model: keras.Model) -> list[Block]:
    """Returns the model's tagged blocks ordered by depth (0 = nearest the input)."""
    found: dict[int, dict] = {}
    prefixes: dict[int, str] = {}
    for layer in model.layers:
        parsed = parse_layer_name(layer.name)
        if parsed is None:
            continue
        idx, part = parsed
        found.setdefault(idx, {})[part] = layer
        prefixes[idx] = layer.name[: -len(part) - 1]
    return [Block(i, prefixes[i], found[i]) for i in sorted(found)]
