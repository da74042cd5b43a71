"""``ablations.Probe``: the probe for your own model in your own training loop (``compile`` + ``fit``).

``Probe(model)`` is a ``keras.Model`` that trains ``model`` exactly like ``model.fit`` would (same loss,
optimizer, metrics, callbacks) and records the statistics in-graph like ``ablate run`` does. After each
``fit`` (or when :meth:`Probe.save_run` is called) it writes a run folder that ``ablate report`` reads:
``experiment.yaml`` and ``arms/<arm_id>/{arm.yaml, history/params/blocks/epochs.parquet, final.keras,
summary.json}``, with the verdicts (and their fixes) in the summary. Tables, summary and verdicts come from
the runner's own code (:func:`ablations.runner.write_tables`, :func:`ablations.runner.arm_results`).

Several probes saved into one run folder (other arm ids) are compared side by side by the report.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from pydantic import ValidationError

from ablations import compat, store
from ablations.config import CaptureConfig, Strict
from ablations.config.errors import Where, format_errors
from ablations.probe.model import ProbedModel, capture_dict
from ablations.probe.recorder import (AUTO_DRAIN, DrainCallback, SnapshotCallback, auto_drain_every, ring_capacity,
                                      weight_bytes)

AXIS = "model"  # the grid axis of a probe run folder: one arm per saved probe
PROBE_SOURCE = "ablations.Probe"  # = ablations.report.data.PROBE_SOURCE (the report imports no TensorFlow)


def select_output(model: keras.Model, output: str | None) -> keras.Model:
    """``model`` itself, or the sub-model ``inputs -> outputs[output]`` (a dict key or an output name).

    The sub-model shares the layers and weights; layers that only feed other outputs are not part of it (the
    loss does not reach them).
    """
    if output is None:
        return model
    if not getattr(model, "outputs", None):
        raise ValueError(f"output={output!r} needs a functional or Sequential model with outputs; {model.name} "
                         "has none (subclassed or not built): leave output=None to use its whole output")
    struct, names = model.output, list(getattr(model, "output_names", None) or [])
    if isinstance(struct, dict) and output in struct:
        tensor = struct[output]
    elif output in names:
        tensor = model.outputs[names.index(output)]
    else:
        keys = list(struct) if isinstance(struct, dict) else []
        raise ValueError(f"{model.name} has no output {output!r}; its outputs: {', '.join(keys or names)}")
    return keras.Model(model.input, tensor, name=model.name)


def checked_capture(capture: Any, drain_every: int | str | None = None) -> CaptureConfig:
    """``capture`` (a dict, a CaptureConfig or None) validated as ``ablate run`` validates the YAML section, with
    ``drain_every`` (when given) over the section's own; a misspelt key or a bad value is a ValueError naming it."""
    cap = capture.model_dump() if isinstance(capture, CaptureConfig) else capture
    if cap is not None and not isinstance(cap, dict):
        raise ValueError(f"Probe(capture=...) takes a dict of the capture section's keys (README \"Capture\"), "
                         f"not {type(cap).__name__}")
    cap = dict(cap or {})
    if drain_every is not None:
        cap["drain_every"] = drain_every
    try:
        return _ProbeArgs.model_validate({"capture": cap}).capture
    except ValidationError as err:
        raise ValueError(format_errors(err, Where("Probe(capture=...)"), _ProbeArgs)) from None


class _ProbeArgs(Strict):
    """The capture section under its YAML name, so errors read ``capture.every`` as in a config file."""

    capture: CaptureConfig = CaptureConfig()


class _Recorder(DrainCallback):
    """The drain, with the epoch length taken from ``fit`` (unknown when the probe is built)."""

    def on_train_begin(self, logs: Any = None) -> None:
        self.steps_per_epoch = self.params.get("steps") or self.steps_per_epoch


@dataclasses.dataclass
class _State:
    """What a probe keeps between ``fit`` calls besides the Keras model."""

    recorder: DrainCallback
    arm_id: str
    out: Path | None
    thresholds: dict[str, float]
    output: str | None
    values: dict[str, Any]
    seed: int = 0
    drain_every: int | str = "auto"  # as given: "auto" is resolved again when compile sets steps_per_execution
    epochs: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    init_tables: dict[str, Any] | None = None  # measure_at_init(): the tables of one batch, no update
    snap_x: Any = None  # a batch of inputs for the snapshot instruments (LSTM/GRU gates)
    start: float | None = None
    dataset: str | None = None


class Probe(ProbedModel):
    """Your model under the probe: compile and fit it like the model itself; statistics are recorded in-graph.

    Args:
        model: a functional or Sequential model (blocks are discovered, nested models included); a subclassed
            model gets per-tensor statistics only, with a note saying why.
        capture: a ``capture`` section as a dict (``{"every": 4, "histograms": True}``; README "Capture"), or
            None for the standard instruments.
        out: a run folder written at the end of every ``fit`` (None: only when :meth:`save_run` is called).
        name: the arm id in the run folder (default: the model's name).
        output: train and measure one named output of a multi-output model (a dict key or output name);
            None: every output, with the compiled loss over all of them (give ``loss`` a dict/list).
        drain_every: steps between host reads of the on-device buffer; None: the capture section's
            ``drain_every``, whose default ``"auto"`` keeps the buffer within 5% of the trainable weights' bytes
            (16 to 256 steps, as ``ablate run`` does).
        thresholds: verdict thresholds (``diagnose:`` keys, e.g. ``{"vanishing_ratio": 1e-4}``).
        values: extra grid values for this arm in the report (default ``{"model": name}``).
        seed: the seed the arm is listed under in the report (the probe itself seeds nothing).
    """

    def __init__(self, model: keras.Model, capture: Any = None, out: str | Path | None = None, *,
                 name: str | None = None, output: str | None = None, drain_every: int | str | None = None,
                 thresholds: dict[str, float] | None = None, values: dict[str, Any] | None = None, seed: int = 0,
                 **kwargs: Any):
        net = select_output(model, output)
        cap = checked_capture(capture, drain_every)
        super().__init__(net, capture=capture, capacity=ring_capacity(cap.every, AUTO_DRAIN[0], AUTO_DRAIN[0], 1),
                         **kwargs)
        steps = self._drain_steps(cap.drain_every, 1)
        self.resize_ring(ring_capacity(self.every, steps, steps, 1))
        # Plain attributes (object.__setattr__): Keras would track dicts and lists assigned to a model.
        state = _State(recorder=_Recorder(steps, steps), arm_id=name or model.name,
                       out=Path(out) if out is not None else None, thresholds=dict(thresholds or {}),
                       output=output, values=dict(values) if values is not None else {AXIS: name or model.name},
                       seed=int(seed), drain_every=cap.drain_every)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "user_model", model)  # saved as final.keras (the whole model, every output)
        object.__setattr__(self, "capture", capture_dict(capture))
        if not self.spec.n_blocks:  # never silent: the summary and the report say it too
            warnings.warn(" ".join(self.spec.notes), UserWarning, stacklevel=2)

    def _drain_steps(self, drain_every: int | str, steps_per_execution: int) -> int:
        if drain_every != "auto":
            return int(drain_every)
        return auto_drain_every(self.ring.bytes_per_capture(), weight_bytes(self.net), self.every, steps_per_execution)

    @property
    def recorder(self) -> DrainCallback:
        """The drain callback ``fit`` runs first (its tables: :meth:`tables`)."""
        return self.state.recorder

    # ------------------------------------------------------------------------------------- Keras API

    def compile(self, *args: Any, steps_per_execution: int = 1, **kwargs: Any) -> None:
        """``keras.Model.compile``; the device buffer grows to hold ``steps_per_execution`` steps per call."""
        steps = self._drain_steps(self.state.drain_every, int(steps_per_execution))
        self.recorder.drain_every = steps
        need = ring_capacity(self.every, steps, steps, int(steps_per_execution))
        if need > self.ring.capacity:
            if self.recorder.model is not None:
                self.recorder.drain()  # keep what the old buffer holds
            self.resize_ring(need)
            self.recorder.forget_counts()
        super().compile(*args, steps_per_execution=steps_per_execution, **kwargs)

    def fit(self, x: Any = None, y: Any = None, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        """``keras.Model.fit`` with the probe's drain added first; writes the run folder after it when ``out``
        is set. Returns Keras' ``History``."""
        st = self.state
        st.start = st.start or time.time()
        if any(i.snapshot_only for i in self.instruments) and st.snap_x is None:
            st.snap_x = _first_inputs(x, kwargs.get("batch_size"))
            self.recorder.snapshot(self, st.snap_x, "init")
        snaps = [SnapshotCallback(self.recorder, lambda: st.snap_x)] if SnapshotCallback.wanted(self) else []
        hist = super().fit(x, y, *args, callbacks=[self.recorder, *snaps, *(callbacks or [])], **kwargs)
        for k, v in hist.history.items():
            st.epochs.setdefault(k, []).extend(v)
        if st.out is not None:
            self.save_run(st.out)
        return hist

    def save(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Saves the user's model (the probe itself is never saved)."""
        self.user_model.save(filepath, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError("a Probe is not serializable; save the model it wraps (probe.save does)")

    # ------------------------------------------------------------------------------------- results

    def measure_at_init(self, batch: Any) -> dict[str, Any]:
        """Records one batch ``(x, y)`` at the current weights without an update (``ablate diagnose --steps
        0``), with the compiled loss, in training mode like the first step of ``fit`` (batch normalization
        uses the batch's statistics and updates its moving averages; no weight changes); these become the
        probe's tables. Compile first."""
        from ablations.probe.measure import measure_tables

        x = batch[0]
        st = self.state
        st.start = st.start or time.time()
        st.init_tables = measure_tables(self.net, tuple(batch[:2]), lambda y, p: compat.compute_loss(
            self, x, y, p, None), capture=self.capture, warn=False, training=True)
        return st.init_tables

    def tables(self) -> dict[str, Any]:
        """Every recorded table (``history``, ``params``, ``blocks``, ...), as ``ablate run`` stores them."""
        st = self.state
        if st.init_tables is not None and not self.recorder.steps:
            return st.init_tables
        if st.snap_x is not None:
            self.recorder.snapshots = {k: [d for d in v if not (d["when"] == "end").all()]
                                       for k, v in self.recorder.snapshots.items()}
            self.recorder.snapshot(self, st.snap_x, "end")
        return self.recorder.tables(self)

    def summary_dict(self, tables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The arm's summary (status, final metrics, ratios, decay rates, notes, verdicts with fixes)."""
        from ablations.probe.facts import facts_of
        from ablations.runner import arm_results

        tables = tables if tables is not None else self.tables()
        st = self.state
        facts = facts_of(self.net, self.spec, getattr(self, "optimizer", None))
        return arm_results(tables, st.epochs, self, diverged_at=self.recorder.diverged_at, lost=self.recorder.lost,
                           dataset=st.dataset, thresholds=st.thresholds, facts=facts)

    def verdicts(self) -> list[dict[str, Any]]:
        """The verdicts of what was recorded so far (each with its ``fixes``)."""
        return self.summary_dict()["verdicts"]

    def save_run(self, out: str | Path | None = None, *, description: str = "") -> Path:
        """Writes the run folder ``out`` (this probe's arm in it; other arms stay) and returns its arm folder."""
        root = Path(out) if out is not None else self.state.out
        if root is None:
            raise ValueError("save_run needs a folder: probe.save_run('runs/mine') or Probe(model, out=...)")
        with store.RunLock(root):
            return write_arm(root, self, description=description)


def _first_inputs(x: Any, batch_size: int | None) -> Any:
    """The inputs of ``fit``'s first batch (a dataset's first element, or the first rows of arrays)."""
    if isinstance(x, tf.data.Dataset):
        return keras.utils.unpack_x_y_sample_weight(next(iter(x)))[0]
    return keras.tree.map_structure(lambda a: a[: batch_size or 32], x)


def write_arm(root: Path, probe: Probe, *, description: str = "") -> Path:
    """``experiment.yaml`` (the arm added to its ``model`` axis) and the arm folder of ``probe`` under ``root``.

    ``summary.json`` is written last, as ``ablate run`` does; the tables and the summary are the runner's.
    """
    import yaml

    from ablations.config import dump_yaml
    from ablations.runner import epochs_table, write_tables

    st = probe.state
    exp_file = root / "experiment.yaml"
    exp = (yaml.safe_load(exp_file.read_text()) or {}) if exp_file.exists() else {}
    grid = exp.setdefault("grid", {})
    for k, v in st.values.items():
        grid.setdefault(k, [])
        if v not in grid[k]:
            grid[k].append(v)
    exp.setdefault("name", root.name)
    exp["source"] = PROBE_SOURCE  # the report then reads every arm as it is (no config to expand)
    exp["description"] = description or exp.get("description") or "models probed in their own training loop"
    store.write_text(exp_file, dump_yaml(exp))
    arm_dir = root / "arms" / st.arm_id
    arm_dir.mkdir(parents=True, exist_ok=True)
    (arm_dir / "summary.json").unlink(missing_ok=True)  # incomplete until written again
    store.write_text(arm_dir / "arm.yaml", dump_yaml(arm_config(probe, exp["name"])))
    tables = probe.tables()
    write_tables(arm_dir, tables, epochs_table(st.epochs), probe.user_model)
    done = sorted(p.name for p in (root / "arms").iterdir() if p.is_dir() and p.name != st.arm_id)
    summary = {"arm_id": st.arm_id, "index": len(done), "experiment": exp["name"], "values": st.values,
               "seed": st.seed, "status": "failed", "error": None}
    summary.update(probe.summary_dict(tables))
    summary["wall_time_s"] = round(time.time() - (st.start or time.time()), 3)
    store.write_json(arm_dir / "summary.json", summary)
    return arm_dir


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """The YAML-safe scalar entries of a Keras ``get_config()``."""
    return {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _loss_config(loss: Any) -> Any:
    if loss is None or isinstance(loss, str):
        return loss
    if isinstance(loss, (dict, list, tuple)):  # one loss per output
        items = loss.items() if isinstance(loss, dict) else enumerate(loss)
        return {str(k): _loss_config(v) for k, v in items}
    if hasattr(loss, "get_config"):
        return {"class": type(loss).__name__, **_plain(loss.get_config())}
    return getattr(loss, "__name__", type(loss).__name__)


def arm_config(probe: Probe, experiment: str) -> dict[str, Any]:
    """What ``arm.yaml`` can say of a model trained outside a config: model, optimizer, loss, capture."""
    opt = getattr(probe, "optimizer", None)
    st, net = probe.state, probe.user_model
    return {"experiment": experiment, "arm_id": st.arm_id, "values": st.values, "seed": st.seed,
            "data": {"name": st.dataset},
            "model": {"source": "ablations.Probe", "name": net.name, "class": type(net).__name__,
                      "params": int(net.count_params()), "output": st.output},
            "train": {"optimizer": {**_plain(opt.get_config()), "name": type(opt).__name__.lower()} if opt else None,
                      "loss": _loss_config(getattr(probe, "loss", None))},
            "capture": probe.capture, "diagnose": st.thresholds}
