"""The glue: one function runs one arm (config + folder in, summary out).

``run_arm`` is the unit the sweep engine (:mod:`ablations.sweep`) schedules; it records NaN/Inf losses as
``diverged`` and exceptions as ``failed`` instead of raising, so one bad arm never stops a sweep.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ablations import store
from ablations.config import Arm, dump_yaml


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run_arm(arm: Arm, arm_dir: Path, *, index: int = 0, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Trains one arm and writes its folder; ``summary.json`` is written last.

    Args:
        arm: the resolved arm.
        arm_dir: its folder (created).
        index: position of the arm in the sweep (keeps report order stable).
        callbacks: extra Keras callbacks (progress display).

    Returns:
        The summary dict (also in ``summary.json``): status completed | diverged | failed.
    """
    import keras

    import zoo
    from ablations.data import builder, load
    from ablations.diagnose import gradient_summary, verdicts
    from ablations.probe import ProbedModel
    from ablations.recorder import DrainCallback, ring_capacity
    from ablations.strategy import apply_precision, configure_devices, set_op_determinism, shard_data
    from ablations.training import make_loss, make_optimizer, make_strategy

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
        with strategy.scope():
            net = zoo.build(cfg.model.arch, input_shape=data.info.input_shape,
                            num_outputs=data.info.num_outputs, **cfg.model.options())
            net = apply_precision(net, cfg.runtime.precision)  # float32: unchanged
            if cfg.model.options().get("initializer") == "lsuv":  # data-driven init needs a training batch
                from zoo import lsuv

                lsuv.apply(net, next(iter(data.train))[0], **(cfg.model.options().get("initializer_options") or {}))
            model = ProbedModel(
                net, every=cfg.capture.every, params=cfg.capture.params,
                updates=cfg.capture.updates, activations=cfg.capture.activations,
                histograms=cfg.capture.histograms,
                capacity=ring_capacity(cfg.capture.every, cfg.capture.drain_every, steps,
                                       cfg.train.steps_per_execution))
            loss, metrics = make_loss(cfg.train.loss, data.info.task)
            optimizer = make_optimizer(cfg.train.optimizer, total_steps=steps * cfg.train.epochs)
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                          steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
        drain = DrainCallback(cfg.capture.drain_every, steps)
        object.__setattr__(model, "drain_callback", drain)  # lets other callbacks (pruning) read the tables
        train = data.train.repeat() if cfg.train.steps_per_epoch else data.train
        gates_init = _gates(net, data.train)
        hist = model.fit(train, epochs=cfg.train.epochs, steps_per_epoch=cfg.train.steps_per_epoch,
                         validation_data=data.val, callbacks=[drain, *callbacks], verbose=0,
                         shuffle=False)
        tables = drain.tables(model)
        if gates_init is not None:  # LSTM/GRU gate means and saturation, at init and at the end
            tables["gates"] = pd.concat([gates_init.assign(when="init"), _gates(net, data.train).assign(when="end")],
                                        ignore_index=True)
        epochs = _epochs_table(hist.history)
        for name, df in [*tables.items(), ("epochs", epochs)]:
            store.write_parquet(arm_dir / f"{name}.parquet", df)
        if cfg.runtime.tensorboard:  # event files from the tables just written (+ final weight histograms)
            from ablations.tensorboard import write_events

            write_events(arm_dir, {**tables, "epochs": epochs}, net)
        store.write_model(arm_dir / "final.keras", net)
        last = {k: _finite(v[-1]) for k, v in hist.history.items() if v}
        stop_reason = getattr(model, "stop_reason", None)  # set by a pruning callback (ablate tune)
        summary.update(
            status="diverged" if drain.diverged_at is not None else ("pruned" if stop_reason else "completed"),
            diverged_at_step=drain.diverged_at,
            pruned_reason=stop_reason,
            final=last,
            steps=int(tables["history"]["step"].max()) + 1 if len(tables["history"]) else 0,
            epochs_run=len(epochs),
            lost_captures=drain.lost,
            num_params=int(net.count_params()),
            dataset=data.info.name,
            baseline_loss=_finite(data.info.metadata.get("baseline_loss")),  # trivial predictor (sequence tasks)
            **{k: _finite(v) for k, v in gradient_summary(tables["params"], tables["blocks"]).items()},
            verdicts=verdicts(tables["params"], tables["blocks"], tables["history"],
                              cfg.diagnose.model_dump()),
        )
    except Exception as err:  # recorded, never raised: the sweep goes on
        summary["error"] = f"{type(err).__name__}: {err}"
        store.write_text(arm_dir / "error.txt", traceback.format_exc())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    summary["wall_time_s"] = round(time.time() - start, 3)
    store.write_json(arm_dir / "summary.json", summary)
    return summary


def _gates(net: Any, train: Any) -> Any:
    """Gate statistics of the model's LSTM/GRU layers on one training batch, or None without such layers."""
    if not any(type(getattr(layer, "cell", None)).__name__ in ("LSTMCell", "GRUCell") for layer in net.layers):
        return None
    from ablations.timegrad import gate_statistics

    x, _ = next(iter(train))
    return gate_statistics(net, x)


def _epochs_table(history: dict[str, list[float]]):
    import pandas as pd

    n = max((len(v) for v in history.values()), default=0)
    df = pd.DataFrame({"epoch": range(n)})
    for k, v in history.items():
        df[k] = list(v) + [float("nan")] * (n - len(v))
    return df
