"""Block discovery for any Keras model: which tensors to tap, which block each parameter belongs to.

``discover(model)`` returns the model's blocks in depth order, one row per trainable tensor, a tap model
that exposes every block's tensors from one forward pass, and notes saying what was found and what not.

The rule, in order (the first one that finds blocks is used for the whole model):

1. **zoo** - layers named ``block_<i>_<part>`` (gradzoo's convention, ``zoo.block_name``): exactly the
   blocks, rows and tensors the probe used so far. ``pre`` is the output of ``block_<i>_linear``, ``act``
   is ``block_<i>_act``, ``skip``/``branch`` are the two inputs of ``block_<i>_add`` (``Add()([skip,
   branch])``), ``gate`` the output of ``block_<i>_gate``. A scope counts as zoo when its indices are
   zero-padded to 3+ digits or a block has a ``linear`` or ``rnn`` part.
2. **names** - layers sharing a block-like name prefix, the way Keras and keras-hub name repeated blocks:
   the shortest prefix ending in ``block<i>``, ``block_<i>``, ``layer<i>`` or ``layer_<i>`` (an optional
   letter after the index: EfficientNet's ``block1a``), e.g. ``conv3_block2_`` (ResNet, DenseNet),
   ``block_1_`` (MobileNetV2), ``block3_`` (VGG), ``transformer_layer_3`` (keras-hub), plus MobileNet's
   ``expanded_conv[_<i>]``. Keras' automatic names count as a series (``my_block``, ``my_block_1``...).
   Needs at least two such prefixes that hold a parametrised layer. What Keras left unnamed joins a named
   block when the structure says so: the layers of a residual Add whose named layers are all in that block
   (Xception's shortcut ``conv2d`` and ``add``), and parameter-free layers fed only by it (a ``re_lu``).
3. **graph** - structure: every 2-input residual ``Add`` (layer or ``+``) is a block holding the layers
   on both sides that are not shared by the two (its branch, and a projection shortcut if any); nested
   residuals go to the innermost. Without residual Adds, every linear layer (Dense, EinsumDense, Conv*,
   attention, recurrent, or a custom layer with weights) that feeds another linear layer starts a block.
   Parameter-free, normalisation and activation layers fed only by a block join it.

Nested functional and Sequential models are opened (:mod:`ablations.probe.flatgraph`): their layers are named
with the nesting (``resnet50/conv2_block1_1_conv``) and block names carry it (``plain_mlp/block_000``).
Blocks are ordered by their depth in the graph (longest path from the inputs); ``index`` 0 is nearest the
input. A parametrised layer outside every block is ``stem`` when it only feeds blocks (before the first),
``head`` when it is only fed by them (after the last), else ``other`` (between blocks, e.g. DenseNet's
transitions); zoo layers named ``stem_*``/``head_*`` keep those roles. All of them get depth -1.

Tap points of a block (names and graph rules): ``pre`` is the output of the block's first linear layer,
on the residual branch when the block ends in a 2-input Add; with a fused activation
(``Dense(activation="sigmoid")``), a recurrent layer or a custom layer (keras-hub's transformer layers,
tapped at their output), ``pre`` is that layer's output, not a pre-activation: ``pre_fused`` is True and
``pre_kind`` says which. ``act`` is the block's first element-wise activation layer (Activation other than
softmax, ReLU, LeakyReLU, PReLU, ELU); ``skip``/``branch`` the inputs of the block's last 2-input Add
(the skip has fewer parametrised layers of its own).

Parameter rows: a row per trainable variable, in ``model.trainable_variables`` order. ``layer`` is the
path of the built-in layer holding it (``bert_backbone/transformer_layer_0/self_attention_layer``; custom
layers are opened down to built-in ones, built-in ones are not: MultiHeadAttention's query/key/value stay
rows of the attention layer); ``param`` is the variable's name, or its path below ``layer`` when the layer
has several of that name (``query/kernel``).

Subclassed models have no graph: rows only (role ``other``), no blocks, a note. The tap model keeps every
output of the model (flattened, ``model.outputs`` order) before the taps.

Outputs and the compiled loss (Keras 3.15 ``CompileLoss``, checked in tests/test_discovery.py): one loss
is applied to every output (the targets must have the outputs' structure) and the per-output losses are
summed with ``loss_weights``; a dict loss is matched to a dict output's keys, or to ``model.output_names``
when the outputs are a list; a list loss goes by position. A probe that wraps the model should therefore
give its compiled loss ``pack_outputs(flat outputs)`` and copy ``output_names`` onto the wrapper (without
it a dict loss on a list-output model fails with ``TypeError: 'NoneType' object is not iterable``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras
import numpy as np
from keras import tree

from ablations import compat
from ablations.instruments.base import BlockView
from ablations.probe import blockrules as rules
from ablations.probe.flatgraph import FlatGraph, NotAGraph, Unit, flatten

TAP_GROUPS = ("pre", "act_in", "skip", "branch", "gate")  # order of the taps after the outputs


@dataclasses.dataclass
class ParamInfo:
    """One trainable variable (a row of ``params.parquet``)."""

    layer: str
    param: str
    role: str  # block | stem | head | other
    depth: int  # block index, -1 outside blocks
    block: str  # block name, or the layer path for non-block rows
    size: int


@dataclasses.dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes:
        blocks: in depth order.
        params: one row per trainable variable, ``model.trainable_variables`` order.
        tap_model: ``tap_model(x) -> [*outputs, *taps]``; a single tensor when there is one output and no
            tap (Keras unpacks one-element lists): use :meth:`split`. The model itself when subclassed.
        notes: human-readable findings (rule, stems/heads, what could not be tapped and why).
        taps: group -> block indices, in tap order (groups in ``TAP_GROUPS`` order).
        n_outputs: number of (flattened) model outputs at the front of the tap model's outputs.
        output_names: the model's output names (what a compiled loss dict is keyed by), if any.
        outputs_struct: the model's output structure, to pack the outputs back (:meth:`pack_outputs`).
    """

    blocks: list[BlockView]
    params: list[ParamInfo]
    tap_model: keras.Model | Callable[..., Any]
    notes: list[str]
    taps: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    n_outputs: int = 1
    output_names: list[str] | None = None
    outputs_struct: Any = None
    inputs: Any = None  # the flattened graph's inputs (what a tap model is built from); None: no graph
    outputs: list[Any] = dataclasses.field(default_factory=list)  # its outputs, flattened

    def split(self, outs: Any) -> tuple[list[Any], dict[str, list[Any]]]:
        """``tap_model`` results -> (flat outputs, {group: [tensor per block in ``taps[group]``]}).

        Without taps the whole result is output (for a subclassed model, its own structure as one item).
        """
        groups: dict[str, list[Any]] = {g: [] for g in TAP_GROUPS}
        if not any(self.taps.get(g) for g in TAP_GROUPS):
            return (tree.flatten(outs) if self.outputs_struct is not None else [outs]), groups
        outs = list(outs)
        flat, rest = outs[: self.n_outputs], outs[self.n_outputs:]
        for g in TAP_GROUPS:
            n = len(self.taps.get(g, []))
            groups[g], rest = rest[:n], rest[n:]
        return flat, groups

    def pack_outputs(self, flat: list[Any]) -> Any:
        """Flat outputs -> the model's own output structure (dict, list or tensor), for its compiled loss."""
        if self.outputs_struct is None:
            return flat[0] if len(flat) == 1 else flat
        return tree.pack_sequence_as(self.outputs_struct, flat)

    def params_frame(self) -> Any:
        """The rows as a pandas DataFrame with ``ProbeSpec.params``' columns."""
        import pandas as pd

        cols = ["depth", "block", "layer", "param", "role", "size"]
        return pd.DataFrame([{c: getattr(p, c) for c in cols} for p in self.params], columns=cols)


def discover(model: keras.Model) -> Discovery:
    """Finds ``model``'s blocks, parameter rows and tap tensors (see the module docstring for the rule)."""
    try:
        fg = flatten(model)
    except NotAGraph as e:
        return _no_graph(model, str(e))
    units = [u for u in fg.units if u.call == 0]
    anc = rules.ancestry(fg.units)
    groups = rules.zoo_groups(units)
    if not groups:
        groups = rules.name_groups(units)
        groups = rules.complete_named(groups, units, anc) if groups else rules.graph_groups(units, anc)
    groups.sort(key=lambda g: (min(u.level for u in g.units), min(u.order for u in g.units)))
    counted = {u.order for u in units if rules.kind(u.op) in ("linear", "opaque")}
    blocks = [_view(i, g, anc, counted) for i, g in enumerate(groups)]
    unit_block = {u.order: b for g, b in zip(groups, blocks) for u in g.units}
    roles = _roles(units, groups, anc, zoo=bool(groups) and groups[0].source == "zoo")
    params, dup_note = _param_rows(model, units, unit_block, roles)
    notes = _notes(model, fg, units, blocks, roles, groups)
    if dup_note:
        notes.append(dup_note)
    tap_model, taps = _tap_model(model, fg, blocks)
    return Discovery(blocks, params, tap_model, notes, taps, len(fg.outputs),
                     list(getattr(model, "output_names", None) or []) or None, fg.outputs_struct,
                     inputs=fg.inputs, outputs=list(fg.outputs))


def _view(index: int, g: rules.Group, anc: dict[int, int], counted: set[int]) -> BlockView:
    """The tap tensors of one group (zoo: by part names; otherwise by layer kinds and structure)."""
    b = BlockView(index, g.name, {k: u.op for k, u in g.parts.items()}, source=g.source)
    if g.source == "zoo":
        lin, act, add, gate, rec = (g.parts.get(p) for p in ("linear", "act", "add", "gate", "rnn"))
        res = (0, 1) if add is not None and len(add.inputs) == 2 else None  # zoo: Add()([skip, branch])
    else:
        lin, act, add, res, rec = _structural_parts(g, anc, counted)
        gate = None
    if lin is not None:
        b.pre, b.pre_layer = lin.outputs[0], lin.path
        b.pre_kind = "block_output" if rules.kind(lin.op) == "opaque" else \
            "fused" if rules.fused(lin.op) else "pre_activation"
        b.pre_fused = b.pre_kind != "pre_activation"
    if act is not None:
        b.act, b.act_input, b.act_output = act.op, act.inputs[0], act.outputs[0]
    if res is not None:
        b.skip, b.branch = add.inputs[res[0]], add.inputs[res[1]]
    if gate is not None:
        b.gate = gate.outputs[0]
    b.recurrent = rec.op if rec is not None else None
    for u in g.units:
        for w in getattr(u.op, "weights", []):
            if w.name in ("alpha", "active") and tuple(w.shape) == ():
                b.scalars.setdefault(w.name, []).append(w)  # a transformer layer has two ReZero alphas
    return b


def _structural_parts(g: rules.Group, anc: dict[int, int], counted: set[int]) -> tuple:
    """``(linear, act, add, (skip, branch) input indices, recurrent)`` units of a names/graph block."""
    ordered = sorted(g.units, key=lambda u: (u.level, u.order))
    adds = [u for u in ordered if rules.kind(u.op) == "add" and len(u.inputs) == 2]
    add = adds[-1] if adds else None  # the Add the block ends in
    res = rules.residual_inputs(add, anc, counted) if add is not None else None
    linear = [u for u in ordered if rules.kind(u.op) == "linear"]
    if res is not None:
        # Prefer the residual branch: ResNet's projection shortcut (conv2_block1_0_conv) is as deep as the
        # branch's first conv (conv2_block1_1_conv), but the branch is what the block computes.
        skip_src, branch_src = add.sources[res[0]], add.sources[res[1]]
        own = anc.get(branch_src, 0) & ~anc.get(skip_src, 0) if branch_src is not None else 0
        linear = [u for u in linear if (own >> u.order) & 1] or linear
    lin = (linear or [u for u in ordered if rules.kind(u.op) == "opaque"] or [None])[0]
    act = next((u for u in ordered if rules.kind(u.op) == "act"), None)
    rec = next((u for u in ordered if isinstance(u.op, (keras.layers.RNN, keras.layers.Bidirectional))), None)
    return lin, act, add, res, rec


def _roles(units: list[Unit], groups: list[rules.Group], anc: dict[int, int], zoo: bool) -> dict[int, str]:
    """``order -> role`` for units outside blocks: stem (only feeds blocks), head (only fed by them), other."""
    in_block = 0
    for g in groups:
        for u in g.units:
            in_block |= 1 << u.order
    feeds = 0  # every unit that is an ancestor of a block unit
    for g in groups:
        for u in g.units:
            feeds |= anc[u.order]
    roles = {}
    for u in units:
        if (in_block >> u.order) & 1:
            continue
        zoo_role = next((r for r in ("stem", "head") if u.name.startswith(r + "_")), None) if zoo else None
        before, after = bool((feeds >> u.order) & 1), bool(anc[u.order] & in_block)
        roles[u.order] = zoo_role or ("stem" if before and not after else "head" if after and not before
                                      else "other")
    return roles


# --------------------------------------------------------------------------------------------- rows


def _relnames(layer: Any) -> list[tuple[str, Any]]:
    """``(name below layer, variable)`` of a built-in layer's trainable variables (``query/kernel``)."""
    out = [(v.name, v) for v in compat.own_trainable_variables(layer)]
    for sub in compat.sublayers(layer):
        out += [(f"{sub.name}/{n}", v) for n, v in _relnames(sub)]
    return out


def _layer_vars(layer: Any, path: str) -> list[tuple[str, str, Any]]:
    """``(layer path, name below it, variable)``: custom layers are opened down to built-in layers."""
    if rules.is_atomic(layer):
        named = _relnames(layer)
        seen = {id(v) for _, v in named}
        named += [(v.name, v) for v in layer.trainable_weights if id(v) not in seen]  # untracked by _layers
        return [(path, n, v) for n, v in named]
    out = [(path, v.name, v) for v in compat.own_trainable_variables(layer)]
    for sub in compat.sublayers(layer):
        out += _layer_vars(sub, f"{path}/{sub.name}")
    return out


def _disambiguate(rows: list[dict]) -> None:
    """Several variables of one name in one layer: name them by their path below the layer, then in full."""
    for key in ("rel", "path"):
        count: dict[tuple[str, str], int] = {}
        for r in rows:
            count[(r["layer"], r["param"])] = count.get((r["layer"], r["param"]), 0) + 1
        for r in rows:
            if count[(r["layer"], r["param"])] > 1:
                r["param"] = r[key]


def _rows(model: keras.Model, owner: dict[int, tuple[str, str]],
          where: Callable[[str, int], tuple[str, int, str]]) -> list[ParamInfo]:
    """One row per trainable variable; ``where(layer path, id(var)) -> (role, depth, block)``."""
    rows = []
    for v in model.trainable_variables:
        layer, rel = owner.get(id(v), (v.path.rsplit("/", 1)[0] if "/" in v.path else v.path, v.name))
        role, depth, block = where(layer, id(v))
        rows.append(dict(layer=layer, param=v.name, rel=rel, path=v.path, role=role, depth=depth, block=block,
                         size=int(np.prod(v.shape))))
    _disambiguate(rows)
    return [ParamInfo(r["layer"], r["param"], r["role"], r["depth"], r["block"], r["size"]) for r in rows]


def _param_rows(model: keras.Model, units: list[Unit], unit_block: dict[int, BlockView],
                roles: dict[int, str]) -> tuple[list[ParamInfo], str | None]:
    owner: dict[int, tuple[str, str]] = {}
    unit_of: dict[int, Unit] = {}
    for u in units:
        if isinstance(u.op, keras.layers.Layer):
            for path, rel, v in _layer_vars(u.op, u.path):
                if id(v) not in owner:
                    owner[id(v)], unit_of[id(v)] = (path, rel), u

    def where(layer: str, vid: int) -> tuple[str, int, str]:
        u = unit_of.get(vid)
        if u is None:
            return "other", -1, layer
        b = unit_block.get(u.order)
        return ("block", b.index, b.name) if b is not None else (roles.get(u.order, "other"), -1, layer)

    missing = sum(1 for v in model.trainable_variables if id(v) not in owner)
    note = (f"{missing} trainable variables belong to no layer call of the graph (role other, named by their "
            "path)") if missing else None
    return _rows(model, owner, where), note


def _no_graph(model: keras.Model, why: str) -> Discovery:
    """Rows only, for models without a functional graph (subclassed, unbuilt Sequential)."""
    owner = {id(v): (p, rel) for p, rel, v in _layer_vars(model, "")}
    owner = {k: (p.lstrip("/") or model.name, rel) for k, (p, rel) in owner.items()}
    params = _rows(model, owner, lambda layer, vid: ("other", -1, layer))
    if isinstance(model, keras.Sequential):
        note = (f"{model.name}: a Sequential model without an input shape has no graph yet, so no blocks or "
                "taps; start it with keras.Input(shape) or call model.build(input_shape)")
    else:
        note = (f"{model.name} ({why}) is a subclassed model with no functional graph: per-tensor rows only "
                "(role other), no blocks and no activation taps; build it with the functional API "
                "(keras.Input -> layers -> keras.Model(inputs, outputs)) to get blocks")
    if not model.trainable_variables:
        note += "; it has no variables yet: build or call it once first"
    return Discovery([], params, model, [note], {g: [] for g in TAP_GROUPS}, 1,
                     list(getattr(model, "output_names", None) or []) or None, None)


# --------------------------------------------------------------------------------------------- taps, notes


def _tap_model(model: keras.Model, fg: FlatGraph, blocks: list[BlockView]) -> tuple[keras.Model, dict]:
    """``Model(inputs, [*outputs, *taps])``: one forward pass gives every output and every tap."""
    taps, groups = [], {}
    for group, attr in zip(TAP_GROUPS, ("pre", "act_input", "skip", "branch", "gate")):
        groups[group] = [b.index for b in blocks if getattr(b, attr) is not None]
        taps += [getattr(blocks[i], attr) for i in groups[group]]
    return keras.Model(fg.inputs, [*fg.outputs, *taps], name=f"{model.name}_taps"), groups


def _names(items: list[str], n: int = 4) -> str:
    return ", ".join(items) if len(items) <= n else f"{', '.join(items[:n])}, ... ({len(items)} in all)"


_RULE = {"zoo": "layer names block_<i>_<part> (zoo convention)", "names": "layer-name prefixes",
         "graph": "graph structure"}


def _notes(model: keras.Model, fg: FlatGraph, units: list[Unit], blocks: list[BlockView], roles: dict[int, str],
           groups: list[rules.Group]) -> list[str]:
    notes = []
    n_param = sum(1 for u in units if rules.has_params(u.op))
    if not blocks:
        notes.append(f"{model.name}: no blocks found among {n_param} parametrised layers, so every row is "
                     "stem/head/other and block statistics stay empty; to get blocks name the layers "
                     "block_<i>_<part> (block_000_linear, block_000_act: the zoo convention), give repeated "
                     "blocks an indexed name prefix (stage1_block2_conv), or build residual Add blocks")
    else:
        kind = _RULE[blocks[0].source]
        if blocks[0].source == "graph":
            kind += " (residual Adds)" if any(b.skip is not None for b in blocks) else " (chain of linear layers)"
        notes.append(f"{len(blocks)} blocks by {kind}: {_names([b.name for b in blocks])}")
    for role in ("stem", "head", "other"):
        paths = [u.path for u in units if roles.get(u.order) == role and rules.has_params(u.op)]
        if paths:
            notes.append(f"{role} (depth -1): {_names(paths)}")
    for k, text in (("fused", "pre is the layer's output after its fused activation (or a recurrent layer's "
                               "output), not a pre-activation: dL/d(layer output)"),
                    ("block_output", "pre is the output of a custom layer whose inside cannot be tapped: "
                                     "dL/d(block output)")):
        hit = [b.name for b in blocks if b.pre_kind == k]
        if hit:
            notes.append(f"{text}, in {_names(hit)}")
    for attr, what in (("pre", "no linear layer to tap"), ("act", "no element-wise activation layer")):
        miss = [b.name for b in blocks if getattr(b, attr) is None]
        if miss:
            notes.append(f"{what} in {_names(miss)}")
    if fg.opened:
        notes.append(f"opened nested models {_names(fg.opened)}: their layers were called again on the outer "
                     "tensors (same weights) so that their tensors can be tapped")
    shared = sorted({u.path for u in fg.units if u.call > 0 and rules.has_params(u.op)})
    if shared:
        notes.append(f"shared layers called more than once: {_names(shared)}; blocks and taps use the first call")
    if len(fg.outputs) > 1:
        names = list(getattr(model, "output_names", None) or [])
        notes.append(f"{len(fg.outputs)} outputs ({_names(names) or 'unnamed'}): the tap model returns all of them "
                     "first, flattened in model.outputs order; apply the compiled loss to all (pack_outputs)")
    return notes + fg.notes
