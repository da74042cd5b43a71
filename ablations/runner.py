"""The glue: one function runs one arm (config + folder in, summary out).

``run_arm`` is the unit the sweep engine (:mod:`ablations.sweep`) schedules; it records NaN/Inf losses as
``diverged`` and exceptions as ``failed`` instead of raising, so one bad arm never stops a sweep.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from ablations import store
from ablations.config import Arm, ArmConfig, dump_yaml


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclasses.dataclass
class Session:
    """What one arm trains: its data, model under the probe, and the probe's drain."""

    data: Any
    steps: int
    net: Any
    model: Any
    drain: Any
    resumed_from: int = 0  # the step training continued from (0: a fresh start)


def run_arm(arm: Arm, arm_dir: Path, *, index: int = 0, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Trains one arm and writes its folder; ``summary.json`` is written last.

    Args:
        arm: the resolved arm.
        arm_dir: its folder (created).
        index: position of the arm in the sweep (keeps report order stable).
        callbacks: extra Keras callbacks (progress display), or factories ``fn(drain) -> callback`` for those
            that read the probe's tables (search pruning); a callback with a ``stop_reason`` that is set marks
            the arm ``pruned``.

    Returns:
        The summary dict (also in ``summary.json``): status completed | diverged | pruned | failed.
    """
    import keras

    cfg = arm.config
    arm_dir = Path(arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "error.txt"):  # an earlier attempt's leftovers must not be read as this one's
        (arm_dir / stale).unlink(missing_ok=True)
    store.write_text(arm_dir / "arm.yaml", dump_yaml(cfg.model_dump(mode="json")))
    summary: dict[str, Any] = {"arm_id": arm.id, "index": index, "experiment": cfg.experiment,
                               "values": cfg.values, "seed": cfg.seed, "status": "failed", "error": None,
                               "diverged_at_step": None}
    start = time.time()
    policy = keras.mixed_precision.global_policy()  # restored after the arm (runtime.precision)
    try:
        session = setup(cfg)
        extra = [cb(session.drain) if callable(cb) and not isinstance(cb, keras.callbacks.Callback) else cb
                 for cb in callbacks]
        tables, history = train(cfg, session, extra, arm_dir)
        epochs = epochs_table(history)
        write_tables(arm_dir, tables, epochs, session.net, tensorboard=cfg.runtime.tensorboard)
        summary.update(results(cfg, session, tables, history, extra))
    except Exception as err:  # recorded, never raised: the sweep goes on
        summary["error"] = f"{type(err).__name__}: {err}"
        store.write_text(arm_dir / "error.txt", traceback.format_exc())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    summary["wall_time_s"] = round(time.time() - start, 3)
    store.write_json(arm_dir / "summary.json", summary)
    from ablations import checkpoint

    if summary["status"] != "failed":  # a failed arm keeps its checkpoint: the rerun continues from it
        checkpoint.clear(arm_dir)  # after the summary: a kill in between leaves a finished arm and a stale file
    return summary


def setup(cfg: ArmConfig) -> Session:
    """Devices, precision, seed, data, strategy, the model (LSUV applied) under the probe, compiled."""
    import keras

    import zoo
    from ablations.data import builder, load
    from ablations.factories import make_loss, make_optimizer
    from ablations.probe import DrainCallback, ProbedModel
    from ablations.probe.recorder import size_ring
    from ablations.strategy import (apply_precision, configure_devices, make_strategy, set_op_determinism,
                                    shard_data)

    configure_devices(cfg.runtime)  # no-op unless runtime.logical_cpus; errors clearly if TF started
    keras.mixed_precision.set_global_policy(cfg.runtime.precision)
    # Prepare the dataset before seeding: TFDS draws from Python's RNG when it prepares one, which would
    # give the first arm of a fresh data dir other initial weights than a rerun of the same arm.
    builder(cfg.data.name, cfg.data.data_dir, cfg.data.download)
    keras.utils.set_random_seed(cfg.seed)
    set_op_determinism(cfg.runtime.deterministic)  # per arm: an earlier arm's setting must not leak
    data = load(cfg.data, cfg.seed)
    steps = cfg.train.steps_per_epoch or data.steps_per_epoch
    strategy = make_strategy(cfg.runtime)
    data.train, data.val = shard_data(strategy, data.train), shard_data(strategy, data.val)
    epoch, stream = data.epoch, data.stream
    data.epoch = lambda k, start=0: shard_data(strategy, epoch(k, start))
    data.stream = lambda start: shard_data(strategy, stream(start))
    with strategy.scope():
        net = build_net(cfg, data.info)
        net = apply_precision(net, cfg.runtime.precision)  # float32: unchanged
        if cfg.model.options().get("initializer") == "lsuv":  # data-driven init needs a training batch
            from zoo import lsuv

            lsuv.apply(net, next(iter(data.train))[0], **(cfg.model.options().get("initializer_options") or {}))
        model = ProbedModel(net, capture=cfg.capture, capacity=1)
        drain_every = size_ring(model, cfg.capture.drain_every, steps, cfg.train.steps_per_execution)
        loss, metrics = make_loss(cfg.train.loss, data.info.task)
        optimizer = make_optimizer(cfg.train.optimizer, total_steps=steps * cfg.train.epochs)
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                      steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
    return Session(data=data, steps=steps, net=net, model=model, drain=DrainCallback(drain_every, steps))


def build_net(cfg: ArmConfig, info: Any) -> Any:
    """The arm's model: a zoo or outside builder (``model.arch``) or a saved file (``model.file``)."""
    import importlib

    import zoo
    from zoo import sources

    for module in cfg.model.imports:
        importlib.import_module(module)
    if cfg.model.file is not None:
        return sources.load_file(cfg.model.file, cfg.model.imports)
    return zoo.build(cfg.model.arch, input_shape=info.input_shape, num_outputs=info.num_outputs,
                     **cfg.model.options())


def train(cfg: ArmConfig, s: Session, callbacks: Sequence[Any], arm_dir: Path | None = None,
          ) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """``model.fit`` with the drain, resumed from the arm's checkpoint when it has one; returns the probe's
    tables and Keras' per-epoch history (of the whole arm, resumed or not)."""
    from ablations import checkpoint
    from ablations.probe.recorder import SnapshotCallback

    key = checkpoint.digest(cfg.model_dump(mode="json"))
    resume = checkpoint.load(arm_dir, key) if arm_dir is not None else None
    if resume is not None:
        checkpoint.restore(s.model, s.drain, resume, next(iter(s.data.train)))
    elif any(i.snapshot_only for i in s.model.instruments):  # e.g. LSTM/GRU gates at init
        s.drain.snapshot(s.model, next(iter(s.data.train))[0], "init")
    saver = checkpoint.Checkpointer(arm_dir, s.drain, s.steps, key, every_steps=cfg.train.checkpoint_steps,
                                    every_epochs=cfg.train.checkpoint_epochs, resume=resume,
                                    history=resume.history if resume else None) if arm_dir is not None else None
    start = resume.step if resume else 0
    history = {k: list(v) for k, v in (resume.history if resume else {}).items()}
    s.resumed_from = start
    snaps = [SnapshotCallback(s.drain, lambda: next(iter(s.data.train))[0])] if SnapshotCallback.wanted(s.model) else []
    cbs = [s.drain, *snaps, *([saver] if saver else []), *callbacks]
    for dataset, first, last, steps in fit_plan(s.data, cfg.train.steps_per_epoch, s.steps, start, cfg.train.epochs):
        hist = s.model.fit(dataset, initial_epoch=first, epochs=last, steps_per_epoch=steps, callbacks=cbs,
                           validation_data=s.data.val, verbose=0, shuffle=False)
        for k, v in hist.history.items():
            history.setdefault(k, []).extend(v)
        if s.model.stop_training:
            break
    if any(i.snapshot_only for i in s.model.instruments):
        s.drain.snapshot(s.model, next(iter(s.data.train))[0], "end")
    return s.drain.tables(s.model), history


def fit_plan(data: Any, fixed_steps: int | None, steps_per_epoch: int, start: int,
             epochs: int) -> list[tuple[Any, int, int, int | None]]:
    """``(dataset, initial_epoch, epochs, steps_per_epoch)`` of the fits that train from step ``start`` on.

    Natural epochs (``train.steps_per_epoch`` null): one fit per epoch on that epoch's batches (the first
    from the interrupted batch on), each ending where the data ends, as a fit over a finite dataset does.
    Fixed steps per epoch: one fit over the stream of batches from step ``start`` on.
    """
    epoch, done = divmod(start, steps_per_epoch)
    if fixed_steps is None:
        return [(data.epoch(k, done if k == epoch else 0), k, k + 1, None) for k in range(epoch, epochs)]
    plan: list[tuple[Any, int, int, int | None]] = []
    if done:
        plan.append((data.stream(start), epoch, epoch + 1, steps_per_epoch - done))
        epoch += 1
    if epoch < epochs:
        plan.append((data.stream(epoch * steps_per_epoch), epoch, epochs, steps_per_epoch))
    return plan


def write_tables(arm_dir: Path, tables: dict[str, Any], epochs: Any, net: Any, *, tensorboard: bool = False) -> None:
    """The arm's Parquet tables, TensorBoard events (``tensorboard``) and ``final.keras``.

    Shared by ``ablate run``, :class:`ablations.Probe` and ``ablate diagnose``.
    """
    for name, df in [*tables.items(), ("epochs", epochs)]:
        store.write_parquet(arm_dir / f"{name}.parquet", df)
    if tensorboard:  # event files from the tables just written (+ final weight histograms)
        from ablations.tensorboard import write_events

        write_events(arm_dir, {**tables, "epochs": epochs}, net)
    store.write_model(arm_dir / "final.keras", net)


def results(cfg: ArmConfig, s: Session, tables: dict[str, Any], epochs: dict[str, list[float]],
            callbacks: Sequence[Any]) -> dict[str, Any]:
    """Status, final metrics, the instruments' summary values and the verdicts of a trained arm."""
    import keras

    from ablations.probe.facts import facts_of

    stop_reason = next((cb.stop_reason for cb in callbacks if getattr(cb, "stop_reason", None)), None)
    facts = facts_of(s.net, s.model.spec, s.model.optimizer, cfg.model.model_dump())
    out = arm_results(tables, epochs, s.model, diverged_at=s.drain.diverged_at, lost=s.drain.lost,
                      dataset=s.data.info.name, thresholds=cfg.diagnose.model_dump(), stop_reason=stop_reason,
                      baseline_loss=s.data.info.metadata.get("baseline_loss"), facts=facts,
                      resumed_from=s.resumed_from)
    if isinstance(s.model.optimizer, keras.optimizers.LossScaleOptimizer):
        out["loss_scale_skipped_steps"] = _skipped(out, s.model.optimizer, s.steps * cfg.train.epochs)
    return out


def _skipped(summary: dict[str, Any], optimizer: Any, batches: int) -> int | None:
    """Batches whose update dynamic loss scaling skipped (overflowed float16 gradients): the batches of every
    epoch less the optimizer's steps, which a skipped batch does not advance; known once all ran (None else)."""
    if summary["status"] != "completed":
        return None
    return batches - int(optimizer.iterations.numpy())


def arm_results(tables: dict[str, Any], epochs: dict[str, list[float]], model: Any, *,
                diverged_at: int | None = None, lost: int = 0, dataset: str | None = None,
                thresholds: dict[str, float] | None = None, stop_reason: str | None = None,
                baseline_loss: Any = None, facts: dict[str, Any] | None = None,
                resumed_from: int | None = None) -> dict[str, Any]:
    """The summary values of a probed training run (every ``summary.json`` key but its identity and time).

    Args:
        tables: the probe's tables (:meth:`~ablations.probe.DrainCallback.tables`).
        epochs: Keras' per-epoch history (``History.history``).
        model: the :class:`~ablations.probe.ProbedModel` (its instruments, spec notes and net).
        diverged_at, lost: the drain's first non-finite step and lost captures.
        dataset, baseline_loss: the data's name and trivial-predictor loss (sequence tasks), if known.
        thresholds: verdict thresholds (``diagnose:``); stop_reason: why a search pruned the arm.
        facts: what the verdicts' fixes need to know (:func:`ablations.probe.facts.facts_of`).
        resumed_from: the step a resumed arm continued from (its checkpoint), if any.
    """
    from ablations.diagnose import verdicts
    from ablations.probe import summarize

    history = tables["history"]
    last = {k: _finite(v[-1]) for k, v in epochs.items() if v}
    status = "diverged" if diverged_at is not None else ("pruned" if stop_reason else "completed")
    views = model.spec.views
    return dict(
        status=status, diverged_at_step=diverged_at, pruned_reason=stop_reason, final=last,
        steps=int(history["step"].max()) + 1 if len(history) else 0, resumed_from_step=resumed_from or None,
        epochs_run=max((len(v) for v in epochs.values()), default=0),
        lost_captures=lost, num_params=int(model.net.count_params()), dataset=dataset,
        baseline_loss=_finite(baseline_loss),  # trivial predictor (sequence tasks)
        **{k: _finite(v) for k, v in summarize(tables, model.instruments).items()},
        n_blocks=len(views), block_rule=views[0].source if views else None, notes=list(model.spec.notes),
        verdicts=verdicts(tables["params"], tables["blocks"], history, thresholds, facts=facts,
                          curvature=tables.get("curvature")),
        capture_cost=model.train_function.cost() if hasattr(model.train_function, "cost") else None)


def epochs_table(history: dict[str, list[float]]) -> Any:
    """The per-epoch Keras history (``epochs.parquet``), NaN-padded to the longest metric."""
    import pandas as pd

    n = max((len(v) for v in history.values()), default=0)
    df = pd.DataFrame({"epoch": range(n)})
    for k, v in history.items():
        df[k] = list(v) + [float("nan")] * (n - len(v))
    return df
