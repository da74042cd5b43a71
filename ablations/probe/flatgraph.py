"""A model's functional graph flattened into one list of layer calls, nested models opened up.

The probe needs dL/d(tensor) for tensors inside the model, from one forward pass under one tape. A
multi-output functional model ``Model(inputs, [outputs, *inner tensors])`` gives exactly that, but only for
tensors connected to ``inputs``: the layers of a functional model nested in another (a keras.applications
base under a new head, a zoo model inside a user model, a keras-hub backbone under a task head) were called
on the nested model's own ``Input``, so the outer graph sees the nested model as one opaque call.

:func:`flatten` walks the graph in topological order and, for every nested functional (or built
Sequential) model, calls that model's layers again on the outer tensors, node by node, with the same call
arguments: same layer objects, so the same weights (nothing is copied). Layers downstream of a nested model
are called again too, because their inputs are new tensors; everything else keeps its original tensors, so
a model without nested models gets its own tensors back and no layer gains a node.

Side effect of opening a nested model: its layers (and the outer layers after it) gain an inbound node.
Keras' ``layer.output`` / ``layer.input`` keep returning the first call's tensors, i.e. the nested model's
own graph, which the tap model cannot compute: take tensors from the units (or discovery's ``BlockView``),
never from ``layer.output``. The original model's outputs, ``model.save`` and its config are unaffected
(they follow the model's own nodes only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import tree

from ablations import compat


class NotAGraph(ValueError):
    """The model has no functional graph (subclassed, or a Sequential that was never built)."""


@dataclasses.dataclass
class Unit:
    """One call of a layer (or a ``keras.ops`` operation) in the flattened graph.

    Attributes:
        op: the layer or operation called.
        path: its name with the nesting, e.g. ``"resnet50/conv2_block1_1_conv"``.
        scope: the nesting prefix of ``path`` (``""`` at the top, else ending in ``"/"``).
        inputs: the call's input tensors (flattened), in the flattened graph.
        outputs: the call's output tensors (flattened), in the flattened graph.
        level: longest path (in calls) from the model inputs; inputs are level 0.
        order: position in the topological walk (ties in ``level`` keep this order).
        call: how many earlier calls of the same layer the walk has seen (0: its first call).
        sources: per input tensor, the ``order`` of the unit that produced it (``None``: a model input).
    """

    op: Any
    path: str
    scope: str
    inputs: list[Any]
    outputs: list[Any]
    level: int
    order: int
    call: int
    sources: list[int | None]

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def parents(self) -> set[int]:
        """``order`` of the units whose outputs this call consumes."""
        return {s for s in self.sources if s is not None}


@dataclasses.dataclass
class FlatGraph:
    """The flattened graph of a model.

    Attributes:
        inputs: the model's input structure (its own ``Input`` tensors; a single input unwrapped).
        outputs: the model's outputs, flattened, in the flattened graph.
        outputs_struct: the model's output structure (dict, list or tensor), to pack ``outputs`` back.
        units: every layer call in topological order.
        opened: paths of the nested models that were opened.
        notes: what could not be followed exactly (masks, shared layers).
    """

    inputs: Any
    outputs: list[Any]
    outputs_struct: Any
    units: list[Unit]
    opened: list[str]
    notes: list[str]


def graph_of(model: Any) -> Any:
    """The functional graph behind ``model``: itself, a built Sequential's, else ``None``."""
    return compat.functional_graph(model)


def flatten(model: keras.Model) -> FlatGraph:
    """Flattens ``model``'s graph (see the module docstring).

    Raises:
        NotAGraph: for subclassed models and Sequential models without a known input shape.
    """
    fn = graph_of(model)
    if fn is None:
        raise NotAGraph(type(model).__name__)
    walk = _Walk()
    tensors = {id(t): t for t in fn.inputs}  # original tensor -> tensor in the flattened graph
    for t in fn.inputs:
        walk.level[id(t)] = 0
    walk.run(fn, tensors, scope="", training=None)
    struct = compat.inputs_struct(fn)
    if isinstance(struct, (list, tuple)) and len(struct) == 1:
        struct = struct[0]  # same structure as the data, like the probe's tap model so far
    return FlatGraph(struct, [tensors[id(t)] for t in fn.outputs], compat.outputs_struct(fn), walk.units, walk.opened,
                     walk.notes)


class _Walk:
    """State of one flattening walk (units so far, tensor levels and producers, call counts)."""

    def __init__(self) -> None:
        self.units: list[Unit] = []
        self.level: dict[int, int] = {}  # id(tensor in the flattened graph) -> level
        self.producer: dict[int, int] = {}  # id(tensor in the flattened graph) -> unit order
        self.calls: dict[int, int] = {}  # id(op) -> calls seen
        self.opened: list[str] = []
        self.notes: list[str] = []

    def run(self, fn: Any, tensors: dict[int, Any], scope: str, training: Any) -> None:
        """Walks ``fn``'s nodes; ``tensors`` maps ``fn``'s tensors to the flattened graph (updated in place)."""
        for node in compat.graph_nodes(fn):
            if node.operation is None or node.is_input:
                continue
            self._node(node, tensors, scope, training)

    def _node(self, node: Any, tensors: dict[int, Any], scope: str, training: Any) -> None:
        op = node.operation
        new_in = [tensors[id(t)] for t in node.input_tensors]
        args, kwargs = compat.node_arguments(node, tensors)
        if training is not None and compat.takes_training(op):
            kwargs = {**kwargs, "training": training}  # an outer `base(x, training=False)` reaches its layers
        inner = graph_of(op)
        if inner is not None:
            self._open(op, inner, node, args, kwargs, tensors, scope)
            return
        if any(a is not b for a, b in zip(new_in, node.input_tensors)):
            outs = tree.flatten(op(*args, **kwargs))  # downstream of an opened model: call again
        else:
            outs = list(node.outputs)  # untouched part of the graph: the model's own tensors
        for old, new in zip(node.outputs, outs):
            tensors[id(old)] = new
        self._add(op, scope, new_in, outs)

    def _open(self, op: Any, inner: Any, node: Any, args: tuple, kwargs: dict, tensors: dict[int, Any],
              scope: str) -> None:
        """Calls the nested model's layers on the outer tensors (its graph, flattened into this one)."""
        value = args[0] if args else kwargs.get("inputs")
        if any(m is not None for m in tree.flatten(kwargs.get("mask"))):  # Keras records {name: None}
            self.notes.append(f"{scope}{op.name}: the explicit mask passed to this nested model is not forwarded "
                              "into its flattened layers (masks carried by the tensors are)")
        inner_tensors = _match_inputs(inner, value)
        for t in inner.inputs:
            self.level.setdefault(id(inner_tensors[id(t)]), 0)
        self.opened.append(scope + op.name)
        if self.calls.get(id(op), 0):
            self.notes.append(f"{scope}{op.name} is called more than once: blocks and taps use its first call")
        self.calls[id(op)] = self.calls.get(id(op), 0) + 1
        self.run(inner, inner_tensors, scope + op.name + "/", kwargs.get("training"))
        outs = [inner_tensors[id(t)] for t in inner.outputs]
        for old, new in zip(node.outputs, outs):
            tensors[id(old)] = new

    def _add(self, op: Any, scope: str, inputs: list[Any], outputs: list[Any]) -> None:
        sources = [self.producer.get(id(t)) for t in inputs]
        level = 1 + max((self.level.get(id(t), 0) for t in inputs), default=0)
        order = len(self.units)
        call = self.calls.get(id(op), 0)
        self.calls[id(op)] = call + 1
        self.units.append(Unit(op, scope + op.name, scope, inputs, outputs, level, order, call, sources))
        for t in outputs:
            self.level[id(t)] = level
            self.producer[id(t)] = order


def _match_inputs(inner: Any, value: Any) -> dict[int, Any]:
    """Maps a nested model's ``Input`` tensors to the values it was called with (as its own call would)."""
    struct = compat.inputs_struct(inner)
    if isinstance(value, dict) and not isinstance(struct, dict):
        value = [value[t.name] for t in tree.flatten(struct)]  # Functional matches dict keys to Input names
    flat = tree.flatten(value)
    if len(flat) != len(inner.inputs):
        raise NotAGraph(f"{inner.name}: called with {len(flat)} tensors for {len(inner.inputs)} inputs")
    return {id(t): v for t, v in zip(inner.inputs, flat)}
