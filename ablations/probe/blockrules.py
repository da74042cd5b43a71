"""Layer kinds and the three rules that group a flattened graph's layer calls into blocks.

Used by :mod:`ablations.probe.discovery` (its docstring states the rules for users). Each rule returns
:class:`Group` objects in no particular order; discovery sorts them by depth in the graph.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import keras

from ablations import compat
from ablations.probe.flatgraph import Unit

AddOp = compat.add_op_class()

L = keras.layers
# Layers whose output is the pre-activation of a block (or, with a fused activation, its post-activation).
LINEAR_TYPES = (L.Dense, L.EinsumDense, *compat.linear_layer_bases(),
                L.MultiHeadAttention, L.GroupQueryAttention, L.RNN, L.Bidirectional)
NORM_TYPES = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization, L.RMSNormalization,
              L.UnitNormalization)
ACT_TYPES = (L.Activation, L.ReLU, L.LeakyReLU, L.PReLU, L.ELU)
# Built-in parametrised layers: their internals (MultiHeadAttention's query/key/value, an LSTM's cell) are
# an implementation detail, so their variables are rows of the layer itself.
ATOMIC_TYPES = LINEAR_TYPES + NORM_TYPES + ACT_TYPES + (L.Embedding,)
_NOT_ELEMENTWISE = {"softmax", "log_softmax"}  # activations whose saturation statistics would mean nothing

ZOO_RE = re.compile(r"^block_(\d+)_(.+)$")
# Name prefixes of repeated blocks in keras.applications / keras-hub: conv3_block2_, block_1_, block3_,
# block1a_ (EfficientNet), transformer_layer_3, stage_0_block_1_ (ConvNeXt), and MobileNet's expanded_conv_.
PREFIX_RES = (re.compile(r"^(.*?(?:block|layer)_?\d+[a-z]?)(?=[_/.]|$)"),
              re.compile(r"^(expanded_conv(?:_\d+)?)(?=[_/]|$)"))


def is_atomic(layer: Any) -> bool:
    """True for built-in layers (rows of their own); custom layers are opened down to their sublayers."""
    return isinstance(layer, ATOMIC_TYPES) or type(layer).__module__.startswith("keras.")


def has_params(op: Any) -> bool:
    return isinstance(op, L.Layer) and bool(op.trainable_weights)


def kind(op: Any) -> str:
    """``linear``, ``embedding``, ``norm``, ``act``, ``add``, ``opaque`` (custom layer with weights),
    ``param`` (other built-in layer with weights) or ``none``."""
    if isinstance(op, L.TimeDistributed):
        return kind(op.layer)
    if isinstance(op, LINEAR_TYPES):
        return "linear"
    if isinstance(op, L.Embedding):
        return "embedding"
    if isinstance(op, NORM_TYPES):
        return "norm"
    if isinstance(op, ACT_TYPES):
        fn = getattr(op, "activation", None)
        return "none" if getattr(fn, "__name__", "") in _NOT_ELEMENTWISE else "act"
    if isinstance(op, (L.Add, AddOp)):
        return "add"
    if has_params(op):
        return "param" if is_atomic(op) else "opaque"
    return "none"


def fused(op: Any) -> bool:
    """True when the layer applies a non-linearity to its own output (``Dense(activation=...)``, an RNN)."""
    op = op.layer if isinstance(op, L.TimeDistributed) else op
    if isinstance(op, (L.RNN, L.Bidirectional)):
        return True
    fn = getattr(op, "activation", None)
    return fn is not None and getattr(fn, "__name__", "linear") != "linear"


@dataclasses.dataclass
class Group:
    """The layer calls of one block, before it is sorted and turned into a ``BlockView``."""

    name: str
    source: str  # zoo | names | graph
    units: list[Unit]
    parts: dict[str, Unit]


def ancestry(units: list[Unit]) -> dict[int, int]:
    """``order -> bitmask`` of the unit and all its ancestors (units come in topological order)."""
    anc: dict[int, int] = {}
    for u in units:
        a = 1 << u.order
        for p in u.parents:
            a |= anc.get(p, 0)
        anc[u.order] = a
    return anc


def _add_parts(group: dict[str, Unit], part: str, unit: Unit) -> None:
    key, n = part, 2
    while key in group:  # a layer name reused in one block (only first calls are grouped)
        key, n = f"{part}#{n}", n + 1
    group[key] = unit


def zoo_groups(units: list[Unit]) -> list[Group]:
    """The zoo's exact rule: ``block_<i>_<part>``, per nesting scope.

    A scope counts as a zoo model when its indices are zero-padded to 3+ digits (``zoo.block_name``) or a
    block has a ``linear`` or ``rnn`` part: MobileNetV2's own ``block_1_expand`` is left to the name rule.
    """
    found: dict[tuple[str, str], dict[str, Unit]] = {}
    for u in units:
        m = ZOO_RE.match(u.name)
        if m:
            found.setdefault((u.scope, m.group(1)), {})[m.group(2)] = u  # zoo.blocks: the last one wins
    zoo_scopes = {scope for (scope, idx), parts in found.items() if len(idx) >= 3 or parts.keys() & {"linear", "rnn"}}
    return [Group(f"{scope}block_{idx}", "zoo", sorted(parts.values(), key=lambda u: u.order), parts)
            for (scope, idx), parts in found.items() if scope in zoo_scopes]


def _prefix(name: str) -> str | None:
    for rx in PREFIX_RES:
        m = rx.match(name)
        if m:
            return m.group(1)
    return None


def name_groups(units: list[Unit]) -> list[Group]:
    """Layers sharing a block-like name prefix (``PREFIX_RES``); needs two or more such prefixes."""
    keys = {u.order: _prefix(u.name) for u in units}
    named = {(u.scope, k) for u in units if (k := keys[u.order])}
    for u in units:  # Keras auto-names a custom block class MyBlock as my_block, my_block_1, ...
        if keys[u.order] is None and (u.scope, f"{u.name}_1") in named:
            keys[u.order] = u.name
    found: dict[str, dict[str, Unit]] = {}
    for u in units:
        k = keys[u.order]
        if k:
            _add_parts(found.setdefault(u.scope + k, {}), u.name[len(k):].lstrip("_/.") or u.name, u)
    groups = [Group(name, "names", sorted(parts.values(), key=lambda u: u.order), parts)
              for name, parts in found.items() if any(has_params(u.op) for u in parts.values())]
    return groups if len(groups) >= 2 else []


def residual_inputs(add: Unit, anc: dict[int, int], counted: set[int]) -> tuple[int, int]:
    """Indices ``(skip, branch)`` of a 2-input Add's inputs: the skip has fewer parametrised layers of its
    own (none for an identity shortcut); ties keep Keras' and the zoo's ``Add()([shortcut, x])`` order."""
    a, b = (anc.get(s, 0) if s is not None else 0 for s in add.sources[:2])
    own = [sum(1 for o in counted if (x & ~y) >> o & 1) for x, y in ((a, b), (b, a))]
    return (1, 0) if own[1] < own[0] else (0, 1)


def residual_sets(units: list[Unit], anc: dict[int, int]) -> list[set[int]]:
    """Per 2-input Add with parametrised layers on a side: the ``order`` of the Add and of every unit on
    exactly one side of it (the branch, and a projection shortcut if any)."""
    orders = [u.order for u in units]
    params = {u.order for u in units if has_params(u.op)}
    sets = []
    for u in units:
        if kind(u.op) == "add" and len(u.sources) == 2:
            a, b = (anc.get(s, 0) if s is not None else 0 for s in u.sources)
            members = {o for o in orders if ((a ^ b) >> o) & 1} | {u.order}
            if members & params:
                sets.append(members)
    return sets


def _grow(owner: dict[int, int], units: list[Unit], may_join: Callable[[Unit], bool]) -> None:
    """Units fed only by one block (all their inputs come from it) join it, in topological order."""
    for u in units:
        if u.order in owner or not u.parents or not may_join(u):
            continue
        blocks = {owner.get(p) for p in u.parents}
        if len(blocks) == 1 and None not in blocks:
            owner[u.order] = blocks.pop()


def _regroup(owner: dict[int, int], units: list[Unit], names: list[str], source: str,
             part_of: Callable[[int, Unit], str]) -> list[Group]:
    groups = []
    for i, name in enumerate(names):
        members = [u for u in units if owner.get(u.order) == i]
        parts: dict[str, Unit] = {}
        for m in members:
            _add_parts(parts, part_of(i, m), m)
        if members:
            groups.append(Group(name, source, members, parts))
    return groups


def complete_named(groups: list[Group], units: list[Unit], anc: dict[int, int]) -> list[Group]:
    """Adds to name-rule blocks what Keras left unnamed: the layers of a residual Add whose named layers
    all belong to one block (Xception's shortcut ``conv2d`` + ``add``, ConvNeXt's ``add``), and
    parameter-free layers fed only by a block (MobileNetV3's ``re_lu_3``)."""
    owner = {u.order: i for i, g in enumerate(groups) for u in g.units}
    for members in residual_sets(units, anc):
        named = {owner[o] for o in members if o in owner}
        if len(named) == 1:
            i = named.pop()
            for o in members:
                owner.setdefault(o, i)
    _grow(owner, units, lambda u: not has_params(u.op))
    known = {id(u): k for g in groups for k, u in g.parts.items()}
    return _regroup(owner, units, [g.name for g in groups], "names", lambda i, u: known.get(id(u), u.name))


def graph_groups(units: list[Unit], anc: dict[int, int]) -> list[Group]:
    """Structure: each 2-input residual Add with its branch; without any, each linear layer that feeds
    another linear layer starts a block. Parameter-free, norm and activation layers fed only by a block
    join it."""
    seeds = residual_sets(units, anc)
    if not seeds:
        starts = [u.order for u in units if kind(u.op) in ("linear", "opaque")]
        down = 0
        for s in starts:
            down |= anc[s] & ~(1 << s)
        seeds = [{s} for s in starts if (down >> s) & 1]
    owner: dict[int, int] = {}
    for u in units:  # a unit inside nested residuals belongs to the innermost one
        fits = [i for i, m in enumerate(seeds) if u.order in m]
        if fits:
            owner[u.order] = min(fits, key=lambda i: len(seeds[i]))
    _grow(owner, units, lambda u: kind(u.op) not in ("linear", "opaque", "embedding"))
    names = []
    for i in range(len(seeds)):
        members = [u for u in units if owner.get(u.order) == i]
        first = next((m for m in members if kind(m.op) in ("linear", "opaque")), members[0] if members else None)
        names.append(first.path if first is not None else "")
    return _regroup(owner, units, names, "graph", lambda i, u: u.name)
