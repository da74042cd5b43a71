"""``ProbedModel``: a ``train_step`` that trains exactly like Keras' and lets the instruments measure it.

One forward pass through a tap model (the net's outputs plus every tensor an enabled instrument asked for),
one tape, one gradient call (weights and tapped tensors together); on captured steps each instrument's
``compute`` runs before the optimizer update and ``after_update`` after it, all their reductions go through
one :class:`~ablations.instruments.base.Reducer` (one norms pass, one all-reduce), and the results are
written into the device ring buffer (:mod:`ablations.probe.ring`), drained by
:class:`~ablations.probe.recorder.DrainCallback`. Steps that are not captured take the other branch of a
``tf.cond`` and cost almost nothing, so ``capture.every: 16`` is cheap.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ablations import compat, instruments
from ablations.instruments.base import SHARED_TABLES, ForwardView, Instrument, Reducer, StepContext
from ablations.instruments.block_scalars import off_mask
from ablations.instruments.kernels import all_reduce_sum, num_replicas, unlowered_cond
from ablations.probe.dispatch import Dispatcher
from ablations.probe.execution import captured_execution
from ablations.probe.ring import Ring
from ablations.probe.spec import make_spec

_LEGACY = ("every", "params", "updates", "activations", "histograms")


def capture_dict(capture: Any = None, **legacy: Any) -> dict[str, Any]:
    """A ``capture`` mapping from a CaptureConfig, a dict or None, with keyword switches applied on top."""
    cap = capture.model_dump() if hasattr(capture, "model_dump") else dict(capture or {})
    cap.update({k: v for k, v in legacy.items() if v is not None})
    return cap


def build_instruments(spec: Any, capture: dict[str, Any], time: bool = True) -> list[Instrument]:
    """The enabled instruments that apply to the model of ``spec``."""
    every = int(capture.get("every", 1))
    out = []
    for cls, opts in instruments.resolve(capture):
        if cls.name == "time_grads" and not time:
            continue
        inst = cls(spec, opts, every=every)
        if inst.applies():
            out.append(inst)
    return out


def collect_taps(insts: list[Instrument]) -> dict[str, list[Any]]:
    """Tap name -> tensors, the union over instruments (instruments asking for one name share its tensors)."""
    taps: dict[str, list[Any]] = {}
    for inst in insts:
        for name, tensors in inst.taps().items():
            if name in taps and [id(t) for t in taps[name]] != [id(t) for t in tensors]:
                raise ValueError(f"instrument {inst.name} asks for tap '{name}' with other tensors than an earlier one")
            taps.setdefault(name, list(tensors))
    return taps


class ProbedModel(compat.StrategyIndependentBuild, keras.Model):
    """Wraps a model; trains it exactly like Keras' own step and records the enabled instruments.

    Args:
        net: the functional model to train (saved as ``final.keras``; the wrapper is never saved).
        capture: a ``capture`` section (:class:`~ablations.config.CaptureConfig` or its dict), or None for the
            defaults. The keyword switches ``every``, ``params``, ``updates``, ``activations`` and
            ``histograms`` override it (the config's aliases).
        capacity: ring buffer slots (captures held on device between drains).
        time: record gradients through time of recurrent models (the ``time_grads`` instrument).
    """

    def __init__(self, net: keras.Model, *, capture: Any = None, capacity: int = 64, time: bool = True,
                 every: int | None = None, params: bool | None = None, updates: bool | None = None,
                 activations: bool | None = None, histograms: bool | None = None, **kwargs: Any):
        super().__init__(name=f"probed_{net.name}", **kwargs)
        cap = capture_dict(capture, every=every, params=params, updates=updates, activations=activations,
                           histograms=histograms)
        spec = make_spec(net)
        insts = build_instruments(spec, cap, time=time)
        taps = collect_taps(insts)
        self.every = int(cap.get("every", 1))
        view = forward_view(spec, insts, taps)
        self.tap_model = tap_model(spec, taps, view)
        if spec.output_names:  # a compiled loss given as a dict is matched to these (several outputs)
            try:
                self.output_names = list(spec.output_names)
            except AttributeError:
                pass
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "instruments", insts)
        object.__setattr__(self, "tap_groups", {k: len(v) for k, v in taps.items()})
        object.__setattr__(self, "train_view", view)  # captured steps train through it (None: the model's own graph)
        object.__setattr__(self, "layout", table_layout(insts, self.every))
        object.__setattr__(self, "ring", Ring(capacity, ring_slots(spec, insts, self.layout, self.every)))
        # Tracked (a list attribute of the model): checkpoints save and resumes restore the instruments' state.
        self.instrument_state = [v for inst in insts for v in inst.state()]

    def resize_ring(self, capacity: int) -> None:
        """A new, empty ring of ``capacity`` captures (before training, or after its drain: the old one is
        dropped)."""
        object.__setattr__(self, "ring", Ring(capacity, ring_slots(self.spec, self.instruments, self.layout,
                                                                   self.every)))

    @property
    def in_graph(self) -> list[Instrument]:
        return [i for i in self.instruments if not i.snapshot_only]

    def call(self, inputs: Any, training: bool = False) -> Any:
        return split_outputs(self.spec, self.tap_groups, self._tap_call(inputs, training))[0]

    def _tap_call(self, x: Any, training: bool, extra: list[Any] | None = None) -> Any:
        """The tap model on ``x`` (and, through a view, on its zero inputs ``extra``: made here when None)."""
        if self.train_view is None:
            return self.tap_model(x, training=training)
        if extra is None:
            extra = self.train_view.zeros(tf.shape(tf.nest.flatten(x)[0])[0])
        return self.tap_model([x, *extra], training=training)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        if self.every == 1:
            y_pred = self._step(x, y, sample_weight, step, capture=True)
        elif num_replicas() > 1:
            # Under several replicas a tf.cond cannot hold the step's sync points (gradient all-reduce, mirrored
            # variable writes): capture every step and record only the due ones.
            return self.captured_train_step(data)
        else:  # steps_per_execution > 1: an execution with a captured step runs its other steps bare
            y_pred = tf.cond(
                tf.equal(step % self.every, 0),
                lambda: self._step(x, y, sample_weight, step, capture=True),
                lambda: self._plain(x, y, sample_weight, step),
            )
        return self._worker_logs(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def captured_train_step(self, data: Any) -> dict[str, Any]:
        """A step that computes every statistic and records them if the step is due: the captured steps of a
        one-call execution, which the host placed on due steps. Without ``train_step``'s ``tf.cond`` around the
        whole step its graph holds one branch, not two; the time it saves is within this host's scatter (the
        benchmark MLP's captured step, every 16, k 16, in the graph: 5.88 against 6.09 ms, medians of 12 rounds)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        due = tf.equal(step % self.every, 0)  # never a record off the capture grid, whatever the host counted
        y_pred = self._step(x, y, sample_weight, step, capture=True, due=due)
        return self._worker_logs(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def plain_train_step(self, data: Any) -> dict[str, Any]:
        """Keras' own step on the bare model (no taps, no statistics): the steps that capture nothing."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self._plain(x, y, sample_weight, tf.cast(self.optimizer.iterations, tf.int64))
        return self._worker_logs(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def make_train_function(self, force: bool = False) -> Any:
        """Compiles the probed and the plain step separately; the fit loop calls a :class:`Dispatcher`.

        With ``steps_per_execution`` k > 1, an execution that holds a captured step runs its captured and plain
        steps in one compiled call (:mod:`ablations.probe.execution`, no per-step ``tf.cond``), wherever its
        first captured step falls; with k 1 a captured step is a call of the probed function.
        """
        if self.train_function is not None and not force:
            return self.train_function
        k = int(self.steps_per_execution)
        probed = self._compiled(self.train_step, k)
        plain, mixed, untimed = probed, None, None
        uncounted = _why_steps_uncounted(self.optimizer)
        if uncounted is None and self.every > 1:
            plain = self._compiled(self.plain_train_step, k)
            if k > 1:
                untimed = _why_not_timed_in_graph()
                mixed = captured_execution(self, k, self.every, timed=untimed is None)
        counter = lambda: int(self.optimizer.iterations.numpy())  # noqa: E731 - once per new iterator
        self.train_function = Dispatcher(plain, probed, self.every, k, counter, mixed=mixed, untimed=untimed,
                                         uncounted=uncounted)
        return self.train_function

    def _compiled(self, step_fn: Any, k: int) -> Any:
        """Keras' compiled train function of ``step_fn`` running ``k`` steps per call.

        Keras builds it from ``self.train_step`` (set to ``step_fn`` for the build) and reads
        ``self.steps_per_execution`` when it traces, lazily on a call: a ``k`` other than the model's own is set
        around every call of the returned function.
        """
        own = k == int(self.steps_per_execution)
        if step_fn == self.train_step:
            super().make_train_function(force=True)
        else:
            self.train_step = step_fn  # instance attribute: Keras compiles what it finds here
            try:
                super().make_train_function(force=True)
            finally:
                del self.train_step
        fn = self.train_function
        if own:
            return fn

        def call(iterator: Any) -> Any:
            saved = self.steps_per_execution
            self.steps_per_execution = k
            try:
                return fn(iterator)
            finally:
                self.steps_per_execution = saved

        return call

    def _plain(self, x: Any, y: Any, sample_weight: Any, step: Any) -> Any:
        with tf.GradientTape() as tape:
            y_pred = self.net(x, training=True)
            loss = compat.compute_loss(self, x, y, y_pred, sample_weight)
            local_loss = compat.unscale_loss(loss)
            batch = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            compat.track_loss(self, local_loss, batch)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        stuck = self._stuck(self._applied(grads))
        self.optimizer.apply_gradients(zip(grads, variables))
        bad = tf.logical_not(tf.math.is_finite(tf.cast(local_loss, tf.float32)))
        self.ring.mark_nonfinite(bad if stuck is None else tf.logical_or(bad, stuck), step)
        return y_pred

    def test_step(self, data: Any) -> dict[str, Any]:
        return self._worker_logs(super().test_step(data))

    def _worker_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        # Keras 3 averages logs over workers with strategy.reduce(MEAN, v, axis=0), which fails on scalars under
        # MultiWorkerMirroredStrategy (tensorflow/tensorflow#72388): give them that axis.
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def _forward(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any, dict[str, list[Any]], list[Any]]:
        """One forward pass under the tape: ``(tape, y_pred, loss, taps, the view's zero inputs)``; the loss
        tracker is updated."""
        extra = self.train_view.zeros(tf.shape(tf.nest.flatten(x)[0])[0]) if self.train_view is not None else []
        with tf.GradientTape() as tape:
            tape.watch(extra)
            y_pred, taps = split_outputs(self.spec, self.tap_groups, self._tap_call(x, True, extra))
            loss = compat.compute_loss(self, x, y, y_pred, sample_weight)
            local_loss = compat.unscale_loss(loss)
            batch = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            compat.track_loss(self, local_loss, batch)
            scaled_loss = self.optimizer.scale_loss(loss)
        return tape, y_pred, (local_loss, scaled_loss), taps, extra

    def _step(self, x: Any, y: Any, sample_weight: Any, step: Any, capture: bool, due: Any = None) -> Any:
        tape, y_pred, (local_loss, scaled_loss), taps, extra = self._forward(x, y, sample_weight)
        variables = self.trainable_variables
        insts = self.in_graph if capture else []
        grad_taps = list(dict.fromkeys(n for i in insts for n in i.grad_taps))
        tap_list = [t for n in grad_taps for t in taps[n]]
        grads = tape.gradient(scaled_loss, variables + tap_list + extra)
        n_vt = len(variables) + len(tap_list)
        grads, tap_grads, extra_grads = grads[: len(variables)], grads[len(variables):n_vt], grads[n_vt:]
        applied = self._applied(grads) if capture else None
        stuck = self._stuck(applied)
        if applied is not None:  # a skipped step is not recorded: the next one has its step number and trains
            due = applied if due is None else tf.logical_and(due, applied)
        ctx = None
        if capture:
            ctx = self._context(x, y, sample_weight, step, local_loss, variables, grads, taps, grad_taps, tap_grads)
            if self.train_view is not None:  # the total derivatives the view exists for, from this backward pass
                ctx.view_grads[self.train_view.key] = [ctx.unscale(g if g is not None else tf.zeros_like(e))
                                                 for g, e in zip(extra_grads, extra)]
        red = Reducer()
        pending = [(i, i.compute(ctx, red)) for i in insts if i.every == self.every]
        if capture:  # before the update, like every other statistic: they see the weights the gradient is of
            ctx.before_update.extend(self._own_cadence(ctx, step, [i for i in insts if i.every != self.every], due))
        with tf.control_dependencies(ctx.before_update if ctx is not None else []):
            self.optimizer.apply_gradients(zip(grads, variables))

        bad = tf.logical_not(tf.math.is_finite(tf.cast(local_loss, tf.float32)))
        if capture:
            pending += [(i, i.after_update(ctx, red)) for i in insts if i.every == self.every]
            resolved = red.finish()
            results = [(i, fin(resolved)) for i, fin in pending if fin is not None]
            rows = assemble(self.layout, self.spec, [r for r in results if r[0].table in SHARED_TABLES])
            own = {i.table: v for i, v in results if i.table not in SHARED_TABLES}
            self.ring.write(self.every, step, {**rows, **own}, due=due)
            # A non-finite gradient also means divergence (unless Keras skipped the step for it): on CPU, fused
            # MatMul+BiasAdd+Relu kernels map NaN to 0, so a ReLU net can keep a finite loss while its gradients
            # and weights are already NaN.
            gnorm = rows["history"][list(self.layout["history"]).index("global_grad_norm"), 0]
            gnorm_bad = tf.logical_not(tf.math.is_finite(gnorm))
            bad = tf.logical_or(bad, gnorm_bad if applied is None else tf.logical_and(gnorm_bad, applied))
        if stuck is not None:
            bad = tf.logical_or(bad, stuck)
        self.ring.mark_nonfinite(bad, step)  # every step, captured or not
        return y_pred

    def _applied(self, grads: list[Any]) -> Any:
        """Whether the optimizer applies this step's update: None without dynamic loss scaling, else Keras' own
        test (``LossScaleOptimizer.check_finite``). Keras skips a step whose loss-scaled gradients overflow,
        halves the scale and leaves the optimizer's step where it was: that is the scale's search (the first
        steps at the default 2**15 often overflow in float16), not divergence."""
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return None
        finite = self.optimizer.check_finite(grads)
        if num_replicas() > 1:
            # Keras 3.15 under MirroredStrategy decides by the first replica's own gradients (its comment takes
            # them for all-reduced; they are not yet): so does this, on every replica.
            first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
            return tf.greater(all_reduce_sum(tf.cast(tf.logical_and(first, finite), tf.float32)), 0.5)
        return finite

    def _stuck(self, applied: Any) -> Any:
        """A skipped step at a loss scale already below 1 (None without loss scaling): its gradients overflow
        float16 unscaled, so no scale represents them; that is divergence (e.g. weights past float16's range make
        every forward pass non-finite while a fused ReLU kernel keeps the loss finite, and Keras would skip every
        step for ever, halving the scale). Read before the update, which halves the scale of a skipped step."""
        if applied is None:
            return None
        return tf.logical_and(tf.logical_not(applied), tf.less(self.optimizer.dynamic_scale, 1.0))

    def _context(self, x: Any, y: Any, sample_weight: Any, step: Any, local_loss: Any, variables: list[Any],
                 grads: list[Any], taps: dict[str, list[Any]], grad_taps: list[str], tap_grads: list[Any]) -> StepContext:
        scale = getattr(self.optimizer, "dynamic_scale", None)  # apply_gradients may change it: read it now
        scale = tf.identity(scale) if scale is not None else None
        ctx = StepContext(spec=self.spec, model=self, x=x, y=y, sample_weight=sample_weight, step=step,
                          loss=local_loss, variables=variables, grads=grads, taps=taps, tap_grads={}, scale=scale,
                          old_weights=None, off=off_mask(self.spec))  # `off` before the update: alpha moves in it
        k = 0
        for name in grad_taps:
            n = self.tap_groups[name]
            ctx.tap_grads[name] = [ctx.unscale(g) for g in tap_grads[k:k + n]]
            k += n
        if any("pre_update_weights" in i.needs_for(self.optimizer) for i in self.in_graph):
            # Reads, not copies: a resource variable updated in place while a read of it is alive is copied
            # first (copy-on-write), so these keep the pre-update values at the cost of that one copy.
            ctx.old_weights = [tf.convert_to_tensor(v) for v in variables]
        return ctx

    def _own_cadence(self, ctx: StepContext, step: Any, insts: list[Instrument], due: Any) -> list[Any]:
        """Instruments with their own ``every`` (a multiple of the probe's): computed on their due steps only,
        before the optimizer update (the update waits for the values returned); one ring write per cadence
        (instruments of one ``every`` share its step counter)."""
        by_every: dict[int, list[Instrument]] = {}
        written: list[Any] = []
        for inst in insts:
            by_every.setdefault(inst.every, []).append(inst)
        for every, group in by_every.items():
            now = tf.equal(step % every, 0)
            if due is not None:
                now = tf.logical_and(now, due)

            def run(group: list[Instrument] = group) -> Any:
                # Tensors made inside the cond's branch must not leak into the step's graph (memo, before_update).
                memo, before = dict(ctx._memo), list(ctx.before_update)  # noqa: SLF001 - our own class
                out = []
                for inst in group:
                    red = Reducer()
                    value = inst.compute(ctx, red)(red.finish())
                    if inst.table in SHARED_TABLES:  # its columns of the shared table, in a slot of their own
                        value = assemble(own_layout(inst), self.spec, [(inst, value)])[inst.table]
                    out.append(tf.cast(value, tf.float32))
                ctx._memo, ctx.before_update = memo, before  # noqa: SLF001
                return out

            if num_replicas() > 1:  # no cond around sync points: compute, record when due
                values = run()
            else:
                nans = lambda group=group: [tf.fill(slot_shape(self.spec, i), float("nan"))  # noqa: E731
                                            for i in group]
                values = unlowered_cond(now, run, nans)
            values = values if isinstance(values, (list, tuple)) else [values]
            self.ring.write(every, step, {slot_name(i): v for i, v in zip(group, values)}, due=now)
            written.extend(values)
        return written


# ------------------------------------------------------------------------------------- the tap model


def tap_model(spec: Any, taps: dict[str, list[Any]], view: ForwardView | None = None) -> Any:
    """``x -> [*outputs, *taps]`` from one forward pass (through ``view``: ``[x, *zeros] -> ...``, the same
    values read in the view); a model without a graph (subclassed) is its own, tapless tap model."""
    if not spec.graph:
        return spec.net
    wanted = [*spec.outputs, *[t for ts in taps.values() for t in ts]]
    if view is None:
        return keras.Model(spec.inputs, wanted, name=f"{spec.net.name}_taps")
    return keras.Model([view.input, *view.extra], [view.tensors[id(t)] for t in wanted],
                       name=f"{spec.net.name}_view_taps")


def forward_view(spec: Any, insts: list[Instrument], taps: dict[str, list[Any]]) -> ForwardView | None:
    """The forward view the enabled instruments ask for, when the probe can train through it: one view (one
    key), on a model with a graph, in which every output and tap has its value. Else None, and instruments
    that read it take a pass of their own (their ``compute`` falls back)."""
    views: dict[str, ForwardView] = {}
    for inst in insts:
        view = None if inst.snapshot_only else inst.forward_view()
        if view is not None:
            views.setdefault(view.key, view)
    if len(views) != 1 or not spec.graph:
        return None
    (view,) = views.values()
    wanted = [*tf.nest.flatten(spec.inputs), *spec.outputs, *[t for ts in taps.values() for t in ts]]
    return view if all(id(t) in view.tensors for t in wanted) else None


def split_outputs(spec: Any, groups: dict[str, int], outs: Any) -> tuple[Any, dict[str, list[Any]]]:
    """Tap-model results -> (the model's outputs in its own structure, {tap name: tensors})."""
    if not spec.graph:
        return outs, {}
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]  # Keras unpacks one-element lists
    n = len(spec.outputs)
    taps, k = {}, n
    for name, count in groups.items():
        taps[name], k = outs[k:k + count], k + count
    return spec.pack_outputs(outs[:n]), taps


# ------------------------------------------------------------------------------------------- layout


def table_layout(insts: list[Instrument], every: int | None = None) -> dict[str, dict[str, int]]:
    """Shared table -> {column: index} of the in-graph columns the enabled instruments write on every capture
    (``every``: the probe's cadence; instruments with another one have a slot of their own; None: all)."""
    layout: dict[str, dict[str, int]] = {t: {} for t in SHARED_TABLES}
    for inst in insts:
        if inst.table in SHARED_TABLES and not inst.snapshot_only and (every is None or inst.every == every):
            for col in inst.columns:
                layout[inst.table].setdefault(col.name, len(layout[inst.table]))
    return layout


def table_rows(spec: Any, table: str) -> int:
    return {"history": 1, "params": spec.n_params, "blocks": spec.n_blocks}[table]


def ring_slots(spec: Any, insts: list[Instrument], layout: dict[str, dict[str, int]],
               every: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Ring slot shapes: shared tables column-major [columns, rows]; own tables their instrument's shape; a
    shared-table instrument with a cadence of its own its columns of the table (:func:`slot_name`)."""
    slots = {t: ((len(cols), table_rows(spec, t)), every) for t, cols in layout.items() if cols}
    for inst in insts:
        if not inst.snapshot_only and (inst.table not in SHARED_TABLES or inst.every != every):
            slots[slot_name(inst)] = (slot_shape(spec, inst), inst.every)
    return slots


def slot_name(inst: Instrument) -> str:
    """The ring slot of an instrument recorded at its own cadence: its own table, or ``<table>@<name>`` for
    its columns of a shared table (merged into that table on the host, NaN on the other captures)."""
    return f"{inst.table}@{inst.name}" if inst.table in SHARED_TABLES else inst.table


def slot_shape(spec: Any, inst: Instrument) -> tuple[int, ...]:
    if inst.table in SHARED_TABLES:
        return (len(inst.columns), table_rows(spec, inst.table))
    return tuple(inst.shape())


def own_layout(inst: Instrument) -> dict[str, dict[str, int]]:
    """:func:`table_layout` of one shared-table instrument alone (its own slot's columns)."""
    return {t: ({c.name: k for k, c in enumerate(inst.columns)} if t == inst.table else {}) for t in SHARED_TABLES}


def assemble(layout: dict[str, dict[str, int]], spec: Any, results: list[tuple[Instrument, Any]]) -> dict[str, Any]:
    """The column-major [columns, rows] tensor of every shared table from the instruments' results.

    Columns that cover every row are stacked; partial ones (blocks without the tensor) are scattered into
    NaN. Columns no instrument wrote this step (e.g. update norms in ``measure``) stay NaN.
    """
    out = {}
    for table, cols in layout.items():
        if not cols:
            continue
        n = table_rows(spec, table)
        given = {name: v for inst, res in results if inst.table == table for name, v in res.items()}
        if all(name in given and given[name][0] is None for name in cols):
            out[table] = tf.stack([tf.reshape(tf.cast(given[name][1], tf.float32), [n]) for name in cols])
            continue
        indices, values = [], []
        for name, (rows, vals) in given.items():
            rows = range(n) if rows is None else rows
            indices.extend([cols[name], r] for r in rows)
            values.append(tf.reshape(tf.cast(vals, tf.float32), [-1]))
        base = tf.fill([len(cols), n], float("nan"))
        out[table] = tf.tensor_scatter_nd_update(base, tf.constant(np.array(indices, np.int32).reshape(-1, 2)),
                                                 tf.concat(values, axis=0)) if values else base
    return out


def _why_steps_uncounted(optimizer: Any) -> str | None:
    """Why the host cannot count the optimizer's steps by the batches it hands out (None: it can). Then every
    step decides on the device whether it captures, and no execution's steps are counted from the host."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # A skipped step (its loss-scaled gradients overflowed) leaves the optimizer's step behind the batches.
        return "dynamic loss scaling: a skipped step does not advance the optimizer's step"
    if getattr(optimizer, "gradient_accumulation_steps", None):
        return (f"gradient_accumulation_steps {optimizer.gradient_accumulation_steps}: the optimizer's step "
                f"advances once per that many batches")
    return None


def _why_not_timed_in_graph() -> str | None:
    """Why the one-call executions cannot read the clock in the graph here, or None where they can."""
    if compat.op_determinism_enabled():  # TensorFlow then refuses to run tf.timestamp (FailedPrecondition)
        return "TF op determinism is on (runtime.deterministic: true), under which TensorFlow refuses tf.timestamp"
    if any(tf.config.list_logical_devices(kind) for kind in ("GPU", "TPU")):
        return "an accelerator is visible, where an in-graph clock would read when kernels were queued, not run"
    return None
