"""Resume inside an arm: a killed arm continues from its last checkpoint, not from step 0.

A checkpoint holds everything the rest of the run depends on, taken between two steps: every variable of the
model (weights, normalisation statistics, random-seed states), of the optimizer (step counter, momenta, loss
scale) and of the metrics (the epoch's running loss and accuracy), the statistics drained so far, the Keras
history of the finished epochs, and the step. The training data are a pure function of the step (epoch k
shuffled with a seed of (arm seed, k): ``ablations.data.Data.epoch``), so a resumed arm trains on exactly the batches it would
have seen; on CPU with op determinism its tables equal those of an uninterrupted run (tests/test_resume.py).

Checkpoints are taken at ``train.checkpoint_steps`` step boundaries (before a step is dispatched, where the
state is consistent even with asynchronous callbacks) and at the end of every ``train.checkpoint_epochs``
epochs, into ``arms/<id>/.resume/``: the arrays (``state.npz``) and then ``state.json`` (step, history, the
arm config's digest), each written atomically, so a kill during a save leaves the previous checkpoint. A
checkpoint of another config is ignored; the folder is removed once the arm's summary is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ablations import store

RESUME_DIR = ".resume"


@dataclasses.dataclass
class Resume:
    """A loaded checkpoint: ``step`` optimizer steps were done; ``metrics`` is None at an epoch boundary."""

    step: int
    history: dict[str, list[float]]
    variables: list[np.ndarray]
    optimizer: list[np.ndarray]
    metrics: list[np.ndarray] | None
    drain: dict[str, Any]


def digest(config: dict[str, Any]) -> str:
    """A short hash of the arm's resolved config: a checkpoint of another config is never resumed."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_variables(model: Any) -> list[Any]:
    """Every variable of the probed model, deduplicated in a stable order (seed-generator states included)."""
    seen, out = set(), []
    for v in model.variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def load(arm_dir: Path, config_digest: str) -> Resume | None:
    """The arm's checkpoint, or None (none, unreadable, or taken for another config)."""
    folder = Path(arm_dir) / RESUME_DIR
    try:
        meta = json.loads((folder / "state.json").read_text())
        if meta.get("digest") != config_digest:
            return None
        with np.load(folder / meta["arrays"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    pick = lambda prefix: [arrays[f"{prefix}/{i}"] for i in range(meta["counts"][prefix])]  # noqa: E731
    drain = {"steps": {int(g): [arrays[f"steps/{g}"]] for g in meta["groups"]},
             "values": {s: [arrays[f"values/{s}"]] for s in meta["slots"]},
             "snapshots": {t: [_frame(rows)] for t, rows in meta.get("snapshots", {}).items()},
             "lost": meta.get("lost", 0)}
    return Resume(step=int(meta["step"]), history=meta["history"], variables=pick("var"),
                  optimizer=pick("opt"), metrics=pick("metric") if meta["counts"].get("metric") else None,
                  drain=drain)


def resumable(arm_dir: Path, config: dict[str, Any]) -> bool:
    """Whether ``arm_dir`` holds a checkpoint of exactly this arm config (without loading its arrays)."""
    try:
        meta = json.loads((Path(arm_dir) / RESUME_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("digest") == digest(config) and (Path(arm_dir) / RESUME_DIR / str(meta.get("arrays"))).exists()


def _frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def restore(model: Any, drain: Any, resume: Resume, batch: Any) -> None:
    """Puts a checkpoint's state back into a freshly built, compiled probed model and its drain.

    ``batch`` (one training batch) builds the compiled metrics now, as the first step would, so that their
    running totals can go back in when the interrupted epoch restarts (:class:`Checkpointer`).
    """
    x, y = batch[0], batch[1]
    model.compute_metrics(x, y, model(x, training=False), sample_weight=None)
    model.reset_metrics()
    for var, value in zip(_model_variables(model), resume.variables, strict=True):
        var.assign(value)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    for var, value in zip(model.optimizer.variables, resume.optimizer, strict=True):
        var.assign(value)
    drain.steps = {g: list(v) for g, v in resume.drain["steps"].items()}
    drain.values = {s: list(v) for s, v in resume.drain["values"].items()}
    drain.snapshots = {t: list(v) for t, v in resume.drain["snapshots"].items()}
    drain.lost = resume.drain["lost"]


def clear(arm_dir: Path) -> None:
    shutil.rmtree(Path(arm_dir) / RESUME_DIR, ignore_errors=True)


class Checkpointer(keras.callbacks.Callback):
    """Saves the arm's state every ``every_steps`` steps and every ``every_epochs`` epochs (None: never).

    Args:
        arm_dir: the arm's folder (checkpoints go to its ``.resume``).
        drain: the probe's drain (drained before each save, so the saved tables hold every captured step).
        steps_per_epoch: to turn Keras' (epoch, batch) into the optimizer step.
        config_digest: :func:`digest` of the arm's config.
        resume: the checkpoint this fit resumes from (its metric states go back in at its first epoch).
        history: the Keras history of the epochs finished before this fit.
    """

    async_safe = True  # no batch-end hook: saves run in on_train_batch_begin, before the next step starts

    def __init__(self, arm_dir: Path, drain: Any, steps_per_epoch: int, config_digest: str, *,
                 every_steps: int | None, every_epochs: int | None, resume: Resume | None = None,
                 history: dict[str, list[float]] | None = None):
        super().__init__()
        self.folder = Path(arm_dir) / RESUME_DIR
        self.drain, self.spe, self.digest = drain, steps_per_epoch, config_digest
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.resume = resume
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.epoch = 0
        self.saved_at = resume.step if resume else 0
        self.saves = 0
        # A fit that starts inside an epoch (a resume) counts its batches from 0: where they really are.
        self.offset = {resume.step // steps_per_epoch: resume.step % steps_per_epoch} if resume else {}

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch
        if self.resume is not None and self.resume.metrics is not None and epoch == self.resume.step // self.spe:
            # Keras has just reset the metrics for this epoch: put back its running totals (same epoch logs).
            for var, value in zip(self.model.metrics_variables, self.resume.metrics, strict=True):
                var.assign(value)
            self.resume = None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        step = self.epoch * self.spe + self.offset.get(self.epoch, 0) + batch
        if self.every_steps and step - self.saved_at >= self.every_steps:
            self.save(step, metrics=True)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(float(v))
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.save((epoch + 1) * self.spe, metrics=False)

    def save(self, step: int, metrics: bool) -> None:
        """Writes the state after ``step`` steps (``metrics``: mid-epoch, the running totals are part of it)."""
        self.drain.drain()
        if self.drain.diverged_at is not None or getattr(self.model, "stop_training", False):
            return  # a diverged arm stops here; its result is recorded, not resumed
        arrays: dict[str, np.ndarray] = {}
        counts = {}
        groups = [("var", _model_variables(self.model)), ("opt", self.model.optimizer.variables)]
        if metrics:
            groups.append(("metric", self.model.metrics_variables))
        for prefix, variables in groups:
            counts[prefix] = len(variables)
            arrays.update({f"{prefix}/{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)})
        with self.drain._lock:  # noqa: SLF001 - our own class: a consistent copy of what it has drained
            steps = {g: np.concatenate(v) for g, v in self.drain.steps.items() if v}
            values = {s: np.concatenate(v) for s, v in self.drain.values.items() if v}
            snapshots = {t: [r for df in v for r in df.to_dict("records")] for t, v in self.drain.snapshots.items()}
            lost = self.drain.lost
        arrays.update({f"steps/{g}": v for g, v in steps.items()})
        arrays.update({f"values/{s}": v for s, v in values.items()})
        name = f"state-{step}.npz"
        store.write_npz(self.folder / name, arrays)
        store.write_json(self.folder / "state.json", {
            "digest": self.digest, "step": step, "arrays": name, "counts": counts, "history": self.history,
            "groups": [str(g) for g in steps], "slots": list(values), "snapshots": snapshots, "lost": lost})
        for old in self.folder.glob("state-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.saved_at, self.saves = step, self.saves + 1
