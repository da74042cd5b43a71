"""The instrument contract: what a statistic declares, and what the probe gives it on a captured step.

An :class:`Instrument` is one statistic family (Cockpit's one-class-per-quantity): it names its table and
columns, the tensors it needs tapped from each block, what it needs from the step, an in-graph ``compute``
and the host-side table building and derived values. The probe (:mod:`ablations.probe`) is a generic loop:
it collects every enabled instrument's taps into one tap model, runs one tape, hands each instrument a
:class:`StepContext`, and lets all of them put their reductions into one shared :class:`Reducer`, so every
norm of the step still goes through one norms pass (one underflow-rescue ``If``) and one all-reduce of the
partial sums (README, Capture overhead).

This module imports no TensorFlow at import time: ``tf`` and ``keras`` below are lazy, so the instrument
registry (names, options, columns) serves the TF-free config layer; TensorFlow loads when a step is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import numpy as np
from ablations.lazy import pd
from pydantic import BaseModel, ConfigDict, Field


from ablations.instruments.kernels import all_reduce_sum, norms, num_replicas, sq_sums
from ablations.lazy import keras, tf  # noqa: F401 - re-exported for the instrument modules

SHARED_TABLES = ("history", "params", "blocks")  # tables several instruments write columns of


# ------------------------------------------------------------------------------------------ declarations


@dataclasses.dataclass(frozen=True)
class Column:
    """One stored column.

    Attributes:
        name: the column name in the Parquet table.
        doc: one line for the README's table reference.
        tag: TensorBoard tag, with ``{layer}``/``{param}``/``{block}`` filled per row (None: not written).
    """

    name: str
    doc: str
    tag: Optional[str] = None


class Options(BaseModel):
    """An instrument's options under ``capture.instruments.<name>`` (strict: a misspelt option fails)."""

    model_config = ConfigDict(extra="forbid")


class EveryOptions(Options):
    """Options of an opt-in instrument with its own cadence."""

    every: Optional[int] = Field(None, gt=0)  # capture every N optimizer steps (null: capture.every)


# ---------------------------------------------------------------------------------------------- blocks


@dataclasses.dataclass
class BlockView:
    """What an instrument may read of one block: its layers and the tensors the probe can tap.

    Attributes:
        index: depth order, 0 nearest the input.
        name: the block's name (zoo: its ``block_<i>`` prefix).
        layers: the block's layers by part name (zoo: ``linear``, ``act``, ``add``, ``gate``, ``rnn``, ...).
        pre: the tensor whose gradient is the block's dL/dz: the output of its first linear layer.
        pre_fused: ``pre`` is the output of a layer with a fused activation (then it is post-activation).
        act: the block's first element-wise activation layer, ``act_input`` its input, ``act_output`` its output.
        skip, branch: the two inputs of the block's residual sum.
        gate: a highway transform gate's output.
        scalars: scalar weights read as block statistics, by name, all of the block's (ReZero ``alpha``: two in
            a transformer layer, one per sub-layer; stochastic depth's ``active``).
        recurrent: the block's recurrent layer.
        pre_kind: ``pre_activation``; ``fused`` (the output of a layer with a fused activation, or of a
            recurrent layer: after the activation); ``block_output`` (the output of a custom layer whose
            inside cannot be tapped, e.g. keras-hub's transformer layers).
        pre_layer: the path of the layer whose output ``pre`` is.
        source: the discovery rule that found the block: ``zoo``, ``names`` or ``graph``.
    """

    index: int
    name: str
    layers: dict = dataclasses.field(default_factory=dict)
    pre: Any = None
    pre_fused: bool = False
    pre_kind: str = ""
    pre_layer: str = ""
    act: Any = None
    act_input: Any = None
    act_output: Any = None
    skip: Any = None
    branch: Any = None
    gate: Any = None
    scalars: dict = dataclasses.field(default_factory=dict)
    recurrent: Any = None
    source: str = "zoo"


@dataclasses.dataclass
class ProbeSpec:
    """Static description of a probed model, built once outside the compiled step.

    Attributes:
        net: the model being trained.
        params: one row per trainable tensor (``depth, block, layer, param, role, size``), in
            ``net.trainable_variables`` order.
        blocks: one row per block (``depth, block``).
        views: the blocks' :class:`BlockView`, in the order of ``blocks``.
        notes: what discovery found and what not, in words (shown by ``measure``/``run``/``diagnose``).
        inputs, outputs: the (flattened) graph's input structure and flat outputs a tap model is built from;
            ``inputs`` is None for a model without a functional graph (subclassed).
        outputs_struct, output_names: the model's output structure and names (its compiled loss's keys).
    """

    net: Any
    params: pd.DataFrame
    blocks: pd.DataFrame
    views: list
    notes: list = dataclasses.field(default_factory=list)
    inputs: Any = None
    outputs: list = dataclasses.field(default_factory=list)
    outputs_struct: Any = None
    output_names: Any = None

    @property
    def graph(self) -> bool:
        """Whether the model has a functional graph (taps possible)."""
        return self.inputs is not None

    def pack_outputs(self, flat: list) -> Any:
        """Flat outputs -> the model's own output structure (dict, list or tensor), for its compiled loss."""
        if self.outputs_struct is None:
            return flat[0] if len(flat) == 1 else flat
        from keras import tree

        return tree.pack_sequence_as(self.outputs_struct, flat)

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def param_block_rows(self) -> np.ndarray:
        """Block row of every parameter (-1 for stem, head and anything outside a block)."""
        rows = {d: i for i, d in enumerate(self.blocks["depth"])}
        return np.array([rows.get(d, -1) if role == "block" else -1
                         for role, d in zip(self.params["role"], self.params["depth"])], np.int32)

    def static(self, table: str) -> pd.DataFrame:
        """The per-row static columns of a shared table (``params``/``blocks``; ``history`` has none)."""
        return {"params": self.params, "blocks": self.blocks}.get(table, pd.DataFrame(index=[0]))


def rows_with(spec: ProbeSpec, attr: str) -> list[tuple[int, Any]]:
    """``[(block row, value)]`` for the blocks whose view has ``attr`` set (e.g. ``pre``, ``gate``)."""
    return [(row, getattr(v, attr)) for row, v in enumerate(spec.views) if getattr(v, attr) is not None]


@dataclasses.dataclass
class ForwardView:
    """A weight-sharing rewrite of the model's forward pass with extra inputs fed zeros, for gradients no tap
    can give: the gradient of a zero added to a tensor inside the model is the total derivative there (through
    a recurrent state: dL/dh_t through every later step). The probe trains its captured steps through it, so
    these gradients come from the training backward pass (``ctx.view_grads[key]``).

    Attributes:
        key: the name the gradients get in ``ctx.view_grads``; instruments asking for one key share one view.
        input: the view's input, standing for the model's (one input: views exist for chain models only).
        extra: the zero-fed inputs whose gradients are read.
        tensors: ``id(tensor of the model's graph)`` -> the same value in the view (taps are read there).
        zeros: batch size -> the zero values of ``extra``.
    """

    key: str
    input: Any
    extra: list
    tensors: dict
    zeros: Callable[[Any], list]


# --------------------------------------------------------------------------------------------- the step


class StepContext:
    """What a captured step offers its instruments (built by the probe inside the traced step).

    Attributes:
        spec, model: the probe spec and the probed Keras model.
        x, y, sample_weight: the step's batch (this replica's part).
        step: the optimizer step (int64 tensor).
        loss: this replica's unscaled batch-mean loss.
        variables: the trainable variables, in ``spec.params`` order.
        grads: this replica's raw gradients (loss-scaled under mixed_float16, None for unconnected ones).
        taps: tap name -> this replica's tapped tensors, in the order the instrument declared them.
        tap_grads: tap name -> their gradients (unscaled, float32), for taps an instrument listed in
            ``grad_taps``.
        old_weights: the weights before the update (when an instrument needs ``pre_update_weights``).
        scale: the loss scale of a LossScaleOptimizer (None without one).
        off: [n_blocks] bool, blocks switched off by design this step (read before the update), or None.
        view_grads: key -> gradients of a :class:`ForwardView`'s zero inputs, when the step ran through one.
        before_update: tensors the optimizer update must wait for (computed from the pre-update weights
            without a copy: the update may only overwrite them once these are done).
    """

    def __init__(self, **kw: Any):
        self.before_update: list[Any] = []
        self.view_grads: dict[str, list[Any]] = {}
        self.__dict__.update(kw)
        self._memo: dict[str, Any] = {}

    def unscale(self, g: Any) -> Any:
        """float32, divided by the loss scale under mixed precision."""
        g = tf.cast(g, tf.float32)
        return g if self.scale is None else g / tf.cast(self.scale, tf.float32)

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """A value computed once per step and shared by instruments (the global gradients, their norms)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def global_grads(self) -> list[Any]:
        """The global-batch gradients: unscaled float32, all-reduced (SUM) over replicas, zeros for None.

        The per-replica losses are already divided by the replica count, so the SUM is the gradient of the
        global mean loss; this copy is for the statistics only (the optimizer reduces its own).
        """
        def make() -> list[Any]:
            grads = [self.unscale(g) if g is not None else tf.zeros(v.shape)
                     for g, v in zip(self.grads, self.variables)]
            return all_reduce_sum(grads)

        return self.memo("global_grads", make)

    def param_skip(self) -> Any:
        """[n_params] bool: parameters of switched-off blocks (their zero gradients skip the rescue)."""
        if self.off is None:
            return None

        def make() -> Any:
            rows = self.spec.param_block_rows()
            return tf.gather(tf.concat([self.off, [False]], axis=0),
                             np.where(rows >= 0, rows, self.spec.n_blocks))

        return self.memo("param_skip", make)

    def grad_norms(self, red: "Reducer") -> int:
        """Handle of the per-tensor global gradient norms (requested once, shared by instruments)."""
        return self.memo("grad_norms", lambda: red.norms(self.global_grads, skip=self.param_skip()))


Resolved = Callable[[int], Any]  # handle -> reduced tensor
# An instrument's in-graph result, given the reduced values: for a shared table {column: (rows, values)}
# (rows None: every row, in table order; else a list of row indices the values are for), for an own table the
# whole [*shape] tensor.
Finish = Callable[[Resolved], Any]


class Reducer:
    """Collects every reduction of a captured step; issues one norms pass and one all-reduce.

    * ``norms(tensors, skip, local)``: L2 norms. Global tensors (all-reduced gradients, weights) and, with one
      replica, local ones go into one :func:`~ablations.instruments.kernels.norms` call (one rescue ``If``).
      Local tensors under several replicas add their sums of squares over replicas instead.
    * ``sums(tensor)``: partial sums of this replica, any shape, returned all-reduced (SUM).

    :meth:`finish` resolves every request; instruments read their handles from the result.
    """

    def __init__(self) -> None:
        self._norm_reqs: list[tuple[list[Any], Any]] = []  # (tensors, skip [n] bool or None)
        self._sum_reqs: list[Any] = []
        self._kinds: list[tuple[str, int]] = []  # handle -> ("norm" | "sum" | "local", index)

    def norms(self, tensors: list[Any], skip: Any = None, local: bool = False) -> int:
        if local and num_replicas() > 1:
            self._kinds.append(("local", len(self._sum_reqs)))
            self._sum_reqs.append(sq_sums(tensors))
        else:
            self._kinds.append(("norm", len(self._norm_reqs)))
            self._norm_reqs.append((list(tensors), skip))
        return len(self._kinds) - 1

    def sums(self, tensor: Any) -> int:
        self._kinds.append(("sum", len(self._sum_reqs)))
        self._sum_reqs.append(tf.cast(tensor, tf.float32))
        return len(self._kinds) - 1

    def finish(self) -> Resolved:
        norm_vals: list[Any] = []
        if self._norm_reqs:
            tensors = [t for ts, _ in self._norm_reqs for t in ts]
            skip = None
            if any(s is not None for _, s in self._norm_reqs):
                skip = tf.concat([s if s is not None else tf.zeros([len(ts)], tf.bool)
                                  for ts, s in self._norm_reqs], axis=0)
            flat = norms(tensors, skip) if tensors else tf.zeros([0])
            norm_vals = tf.split(flat, [len(ts) for ts, _ in self._norm_reqs]) if len(self._norm_reqs) > 1 \
                else [flat]
        sum_vals: list[Any] = []
        if self._sum_reqs:
            shapes = [s.shape for s in self._sum_reqs]
            total = all_reduce_sum(tf.concat([tf.reshape(s, [-1]) for s in self._sum_reqs], axis=0))
            parts = tf.split(total, [int(np.prod(s)) for s in shapes]) if len(shapes) > 1 else [total]
            sum_vals = [tf.reshape(p, s) for p, s in zip(parts, shapes)]
        kinds = self._kinds

        def resolved(handle: int) -> Any:
            kind, i = kinds[handle]
            if kind == "norm":
                return norm_vals[i]
            return tf.sqrt(sum_vals[i]) if kind == "local" else sum_vals[i]

        return resolved


# ----------------------------------------------------------------------------------------- instruments


class Instrument:
    """Base of every statistic family; subclasses live one per module in :mod:`ablations.instruments`.

    Class attributes (the declaration, read without TensorFlow by the registry and the report):
        name: the name under ``capture.instruments``.
        table: ``history``, ``params`` or ``blocks`` (shared tables, one row per step / tensor / block), or
            the instrument's own table name (then :meth:`shape` and :meth:`frame` define it).
        columns: the in-graph columns it writes (shared tables), or its own table's columns.
        derived: host-side columns it adds to tables after training: ``(table, Column)``.
        summary_keys: keys it adds to ``summary.json`` (:meth:`summarize`).
        default: on unless switched off (the standard set); opt-in otherwise.
        order: position among the instruments (column order of shared tables).
        needs: from the step: ``grads`` (global gradients), ``pre_update_weights`` (a copy before the update),
            ``before_update`` (an own-cadence ``compute`` that must run before the update, at the weights the
            step's gradient was taken at; the update waits for it).
        grad_taps: tap names whose gradient the step must compute (dL/d(tap)).
        Opts: the pydantic model of its options.
    """

    name: ClassVar[str] = ""
    table: ClassVar[str] = ""
    columns: ClassVar[tuple[Column, ...]] = ()
    derived: ClassVar[tuple[tuple[str, Column], ...]] = ()
    summary_keys: ClassVar[tuple[str, ...]] = ()
    default: ClassVar[bool] = True
    order: ClassVar[int] = 100
    needs: ClassVar[frozenset] = frozenset()
    grad_taps: ClassVar[tuple[str, ...]] = ()
    Opts: ClassVar[type[Options]] = Options
    snapshot_only: ClassVar[bool] = False  # no in-graph part: :meth:`snapshot` at the start and end of training
    # Snapshot instruments: further tables :meth:`snapshot` returns (then as ``{table: DataFrame}``), with their
    # columns (for the report's loader, the claims and the README's table reference).
    more_tables: ClassVar[tuple[tuple[str, tuple[Column, ...]], ...]] = ()
    snapshot_every: Optional[int] = None  # snapshot instruments: also every N optimizer steps (host side)
    snapshot_step: int = 0  # the optimizer step of the weights a snapshot sees (set by the recorder)

    def __init__(self, spec: ProbeSpec, options: Options | None = None, every: int = 1):
        self.spec = spec
        self.options = options if options is not None else self.Opts()
        # Own tables may have their own cadence (a multiple of the step's `every` is not required).
        own = getattr(self.options, "every", None)
        self.every = int(own) if own else int(every)

    # ---- declarations that depend on the model
    def applies(self) -> bool:
        """Whether the model has what this instrument measures (else its columns are NaN / no table)."""
        return True

    def needs_for(self, optimizer: Any) -> frozenset:
        """:attr:`needs` for the optimizer in use (e.g. no pre-update copy when it can be avoided)."""
        return self.needs

    def taps(self) -> dict[str, list[Any]]:
        """Tap name -> the Keras tensors to tap (one forward pass exposes all of them)."""
        return {}

    def forward_view(self) -> Optional[ForwardView]:
        """A rewrite of the forward pass whose zero inputs' gradients this instrument reads (None: none).
        ``compute`` must also work without it (``measure``, or when the probe cannot train through it)."""
        return None

    def state(self) -> list[Any]:
        """Variables the instrument keeps across steps (e.g. a copy of the initial weights), created on the
        first call, under the strategy's scope. The probe tracks them, so a checkpoint saves and a resume
        restores them with the model's own variables."""
        return []

    def shape(self) -> tuple[int, ...]:
        """Own tables: the per-capture value shape stored in the ring buffer."""
        return ()

    # ---- in graph
    def compute(self, ctx: StepContext, red: Reducer) -> Finish | None:
        """Before the optimizer update: request reductions, return how to finish (or None)."""
        return None

    def after_update(self, ctx: StepContext, red: Reducer) -> Finish | None:
        """After the optimizer update (for values that need the new weights)."""
        return None

    # ---- on the host
    def frame(self, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        """Own tables: the long DataFrame of the drained captures ``values`` [n, *shape]."""
        raise NotImplementedError

    def snapshot(self, x: Any, when: str) -> pd.DataFrame | dict[str, pd.DataFrame] | None:
        """Snapshot instruments: their table rows for one training batch ``x`` (``when``: init | end, or
        ``step`` for the snapshots every :attr:`snapshot_every` steps); a dict when it writes
        :attr:`more_tables` too."""
        return None

    @classmethod
    def derive(cls, tables: dict[str, pd.DataFrame]) -> None:
        """Adds the :attr:`derived` columns to ``tables`` in place."""

    @classmethod
    def summarize(cls, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        """Summary values of an arm from its tables."""
        return {}

    @classmethod
    def tensorboard(cls, tables: dict[str, pd.DataFrame], events: Any) -> None:
        """Histograms beyond the tagged columns (``events``: :class:`ablations.tensorboard._Events`)."""


def scatter_rows(n: int, rows: list[int], values: Any) -> Any:
    """A [n] float32 vector holding ``values`` at ``rows`` and NaN elsewhere (blocks without the tensor)."""
    return tf.tensor_scatter_nd_update(tf.fill([n], float("nan")), tf.constant([[r] for r in rows], tf.int32),
                                       tf.cast(values, tf.float32))
