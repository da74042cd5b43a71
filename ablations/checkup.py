"""``ablate diagnose MODEL.keras``: a saved model, nobody's config, probed for N steps and judged.

1. ``--import`` modules are imported (they register the model's custom objects), then the file is loaded with
   ``keras.saving.load_model(path, safe_mode=True)`` (no arbitrary code from the file);
2. the data comes through gradzoo's TFDS loader (:mod:`ablations.data`; ``digits`` is bundled), reshaped per
   example when the model takes the same number of values in another shape (``(64,)`` for 8x8 images);
3. the model is trained for N probed steps with :class:`ablations.Probe` (N = 0: one batch at the loaded
   weights, no update), into a run folder with a report, and its verdicts are printed with their fixes;
4. with ``--try-fixes`` each fix that can be applied to an outside model (activation, initializer, clipping,
   learning rate; :data:`ablations.diagnose.TRYABLE`) is applied to a copy made by
   ``keras.models.clone_model`` (the user's file is never touched), trained for the same N steps from the
   same data, and compared: AUTOTRAINER's repair loop (Zhang et al. 2021), with measurements.

Exit codes: 0 no verdict, 3 verdicts found, 2 bad input (file, module, data, options), 1 training failed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable

EXIT_HEALTHY, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_VERDICTS = 0, 1, 2, 3
SATURATING_TO = "relu"  # what the activation fix puts in place of sigmoid/tanh (He et al. 2015)
INIT_TO = "he_normal"
CLIP_TO = 1.0  # global_clipnorm (Pascanu et al. 2013)
LR_FACTOR = {"exploding": 0.1, "rising_loss": 0.1, "dead_units": 0.1, "stalled": 10.0}


class DiagnoseError(ValueError):
    """Bad input to ``ablate diagnose`` (exit 2); the message says what to do."""


@dataclasses.dataclass
class Options:
    """``ablate diagnose``'s arguments."""

    model: Path
    data: str = "digits"
    steps: int = 50
    batch: int = 64
    loss: str = "auto"
    optimizer: str | None = None  # None: the one the model was saved with, else sgd
    lr: float | None = None  # None: the saved optimizer's, else 0.01
    imports: tuple[str, ...] = ()
    out: Path | None = None
    seed: int = 0
    try_fixes: bool = False


@dataclasses.dataclass
class Setup:
    """What every probed run of one diagnosis shares: the data, the loss and how to make an optimizer."""

    model: Any  # the loaded model (never trained itself: each run trains a copy)
    data: Callable[[], Any]  # a fresh ablations.data.Data (same seed: every run sees the same batches)
    loss: Any
    metrics: list[Any]
    optimizer: Callable[..., Any]  # optimizer(**overrides) -> a fresh Keras optimizer
    steps: int
    seed: int


# ------------------------------------------------------------------------------------------- input


def import_modules(names: tuple[str, ...] | list[str]) -> None:
    """Imports the modules that register the model's custom objects (``--import pkg.layers``)."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or the module itself failing
            raise DiagnoseError(f"--import {name}: {type(err).__name__}: {err}") from None


def load_model(path: Path) -> Any:
    """``keras.saving.load_model(path, safe_mode=True)``, with errors that say what to do."""
    import keras

    path = Path(path)
    if not path.exists():
        raise DiagnoseError(f"{path}: no such file")
    if path.suffix != ".keras":
        raise DiagnoseError(f"{path}: not a .keras file (save it with model.save('{path.stem}.keras'))")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = (" The model holds a Lambda layer or other code that safe_mode refuses to run: replace it by a "
                "registered custom layer." if "safe_mode" in str(err) else
                " If it uses custom layers, import the module that registers them with --import MODULE "
                "(@keras.saving.register_keras_serializable).")
        raise DiagnoseError(f"{path}: cannot be loaded ({type(err).__name__}: {text}).{hint}") from None


def _model_input(model: Any) -> tuple[int, ...]:
    shape = model.input_shape
    if isinstance(shape, list) or (isinstance(shape, tuple) and shape and isinstance(shape[0], tuple)):
        raise DiagnoseError(f"{model.name} takes several inputs; `ablate diagnose` feeds one (use ablations.Probe "
                            "in your own loop for several)")
    return tuple(shape[1:])


def prepare_data(name: str, batch: int, model: Any, seed: int) -> Any:
    """The dataset's training pipeline, its inputs reshaped to the model's input shape when only the shape
    differs."""
    import numpy as np

    from ablations.config import DataConfig
    from ablations.data import DataError, load

    try:
        data = load(DataConfig(name=name, batch_size=batch, val_split=None), seed)
    except DataError as err:
        raise DiagnoseError(str(err)) from None
    want, have = _model_input(model), data.info.input_shape
    if None not in want and tuple(want) != tuple(have):
        if int(np.prod(want)) != int(np.prod(have)):
            raise DiagnoseError(f"{model.name} takes inputs of shape {want}, dataset '{name}' has {have}: choose "
                                "a dataset of that size (--data) or save the model with a matching input")
        target = [-1, *want]
        data.train = data.train.map(lambda x, y: (__import__("tensorflow").reshape(x, target), y))
    out = model.output_shape
    units = out[-1] if isinstance(out, tuple) and out and not isinstance(out[0], tuple) else None
    if data.info.task == "classification" and units is not None and units < data.info.num_outputs:
        raise DiagnoseError(f"{model.name} has {units} outputs, dataset '{name}' has {data.info.num_outputs} "
                            "classes: choose another dataset or a model with as many outputs")
    return data


def _ends_in(model: Any, name: str) -> bool:
    last = model.layers[-1] if getattr(model, "layers", None) else None
    fn = getattr(last, "activation", None)
    return type(last).__name__.lower() == name or getattr(fn, "__name__", "") == name


# Losses that compare the outputs element by element with the targets: on class indices [B] against outputs
# [B, classes] they broadcast, and the net would learn to output the class index in every unit.
_ELEMENTWISE = {"mse", "mean_squared_error", "mae", "mean_absolute_error", "mape", "mean_absolute_percentage_error",
                "msle", "mean_squared_logarithmic_error", "huber", "huber_loss", "log_cosh", "logcosh",
                "binary_crossentropy", "binary_focal_crossentropy", "hinge", "squared_hinge", "kl_divergence",
                "kld", "poisson", "categorical_crossentropy", "categorical_hinge", "categorical_focal_crossentropy"}
_SQUARE = {"mse", "mean_squared_error"}


def _loss_name(loss: Any) -> str:
    name = loss if isinstance(loss, str) else getattr(loss, "name", None) or getattr(loss, "__name__", "")
    return str(name).lower()


def _check_class_targets(loss: Any, name: str, model: Any, task: str, given: str) -> Any:
    """``loss`` for class-index labels: mse becomes the square loss against one-hot targets; other element-wise
    losses are refused (they would broadcast [B] against [B, classes] and train on a wrong target silently)."""
    if task != "classification" or _loss_name(loss) not in _ELEMENTWISE:
        return loss
    units = (getattr(model, "outputs", None) or [None])[0]
    if units is None or units.shape[-1] in (None, 1):
        return loss  # one output unit: [B] against [B, 1] is the intended pairing (a binary label)
    if _loss_name(loss) in _SQUARE:
        from ablations.factories import OneHotMeanSquaredError

        return OneHotMeanSquaredError()
    raise DiagnoseError(f"{given} {name}: the dataset's labels are class indices and the model has "
                        f"{units.shape[-1]} outputs, so {name} would compare every output with the class index; "
                        "use sparse_categorical_crossentropy, or mse (the square loss against one-hot targets)")


def choose_loss(name: str, model: Any, task: str) -> tuple[Any, list[Any]]:
    """The loss (and metrics): ``auto`` is the one the model was compiled with, else one for the task;
    cross-entropies read logits unless the model ends in softmax/sigmoid. On a classification dataset (labels:
    class indices) ``mse`` is the square loss against one-hot targets and other element-wise losses are refused."""
    import keras

    if name == "auto":
        saved = getattr(model, "loss", None)
        if saved is not None:
            loss = _check_class_targets(saved, _loss_name(saved), model, task, "the model's compiled loss")
            return loss, (["accuracy"] if task == "classification" else [])
        name = "sparse_categorical_crossentropy" if task == "classification" else "mse"
    metrics = ["accuracy"] if "crossentropy" in name or task == "classification" else []
    if name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        cls = keras.losses.SparseCategoricalCrossentropy if name.startswith("sparse") else \
            keras.losses.CategoricalCrossentropy
        loss = cls(from_logits=not _ends_in(model, "softmax"))
    elif name == "binary_crossentropy":
        loss = keras.losses.BinaryCrossentropy(from_logits=not _ends_in(model, "sigmoid"))
    else:
        try:
            loss = keras.losses.get(name)
        except ValueError:
            raise DiagnoseError(f"--loss {name}: not a Keras loss (e.g. sparse_categorical_crossentropy, mse, "
                                "huber)") from None
    return _check_class_targets(loss, name, model, task, "--loss"), metrics


def optimizer_factory(name: str | None, lr: float | None, model: Any) -> Callable[..., Any]:
    """``make(**overrides)`` -> a fresh optimizer: the saved one's class and config (``--optimizer`` and
    ``--lr`` override), else gradzoo's ``sgd`` at 0.01; ``make.learning_rate`` is the rate (None under a
    schedule)."""
    saved = getattr(model, "optimizer", None)
    if name is None and saved is not None:
        cls, base = type(saved), saved.get_config()
        if lr is not None:
            base["learning_rate"] = lr

        def from_saved(**over: Any) -> Any:
            cfg = {**base, **over}
            if "global_clipnorm" in over:
                cfg["clipnorm"] = None  # Keras allows one of the two
            return cls.from_config(cfg)

        rate = base.get("learning_rate")
        from_saved.learning_rate = float(rate) if isinstance(rate, (int, float)) else None  # type: ignore[attr-defined]
        return from_saved
    from pydantic import ValidationError

    from ablations.config import OptimizerConfig
    from ablations.factories import make_optimizer

    try:
        base_cfg = OptimizerConfig(name=name or "sgd", learning_rate=lr if lr is not None else 0.01)
    except ValidationError as err:
        raise DiagnoseError(f"--optimizer/--lr: {err.errors()[0]['msg']} (optimizers: sgd, adam, adamw, rmsprop, "
                            "adagrad)") from None
    def make(**over: Any) -> Any:
        return make_optimizer(base_cfg.model_copy(update=over))

    make.learning_rate = base_cfg.learning_rate  # type: ignore[attr-defined]
    return make


# ------------------------------------------------------------------------------------------- runs


def probe_run(net: Any, setup: Setup, root: Path, arm_id: str, fix: str, optimizer: dict[str, Any] | None = None,
              label: str = "") -> dict[str, Any]:
    """Trains ``net`` for ``setup.steps`` probed steps (0: one batch, no update) into the arm ``arm_id`` of the
    run folder ``root``; returns its summary."""
    import keras

    from ablations import store
    from ablations.probe.api import Probe

    keras.utils.set_random_seed(setup.seed)  # every run sees the same batches in the same order
    with warnings.catch_warnings():  # a model without blocks: `run` prints the notes itself
        warnings.simplefilter("ignore", UserWarning)
        probe = Probe(net, name=arm_id, values={"fix": fix}, seed=setup.seed)
    # A fresh pipeline per run: a reshuffling dataset iterated again would deal other batches.
    data = setup.data()
    probe.state.dataset = data.info.name
    probe.compile(optimizer=setup.optimizer(**(optimizer or {})), loss=setup.loss, metrics=setup.metrics)
    if setup.steps > 0:
        probe.fit(data.train.repeat(), epochs=1, steps_per_epoch=setup.steps, verbose=0, shuffle=False)
    else:
        probe.measure_at_init(next(iter(data.train)))
    arm_dir = probe.save_run(root, description=label)
    return store.read_summary(arm_dir)


def copy_model(model: Any, activation: str | None = None, initializer: str | None = None) -> Any:
    """A copy of ``model`` by ``keras.models.clone_model`` (nested models too), saturating activations
    replaced by ``activation`` and kernel initializers by ``initializer``; the weights are copied unless
    ``initializer`` is given (then the copy is freshly initialized: that is the fix)."""
    import keras

    from ablations.diagnose import SATURATING

    def clone(layer: Any) -> Any:
        cfg = layer.get_config()
        if activation and cfg.get("activation") in SATURATING:
            cfg["activation"] = activation
        if initializer and "kernel_initializer" in cfg:
            cfg["kernel_initializer"] = initializer
        return layer.__class__.from_config(cfg)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if initializer is None:
        copy.set_weights(model.get_weights())
    return copy


def variants(model: Any, found: list[dict[str, Any]], base_lr: float | None) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(fix name, model copy, optimizer overrides)`` for every tryable fix of the verdicts ``found``
    (once each), plus activation and initializer together when both apply (ReLU with He init). The learning
    rate moves from ``base_lr`` by :data:`LR_FACTOR` (none under a schedule: ``base_lr`` None)."""
    kinds: dict[str, str] = {}
    for v in found:
        for f in v.get("fixes") or []:
            if f.get("tryable"):
                kinds.setdefault(f["kind"], v["kind"])
    out: list[tuple[str, Any, dict[str, Any]]] = []
    if "activation" in kinds:
        out.append((SATURATING_TO, copy_model(model, activation=SATURATING_TO), {}))
    if "initializer" in kinds:
        out.append((INIT_TO, copy_model(model, initializer=INIT_TO), {}))
    if "activation" in kinds and "initializer" in kinds:
        out.append((f"{SATURATING_TO}+{INIT_TO}", copy_model(model, activation=SATURATING_TO, initializer=INIT_TO), {}))
    if "clipping" in kinds:
        out.append((f"global_clipnorm={CLIP_TO:g}", copy_model(model), {"global_clipnorm": CLIP_TO}))
    if "learning_rate" in kinds and base_lr:
        lr = float(f"{base_lr * LR_FACTOR.get(kinds['learning_rate'], 0.1):.3g}")
        out.append((f"lr={lr:g}", copy_model(model), {"learning_rate": lr}))
    return out


# ------------------------------------------------------------------------------------------- the command


def run_folder(opts: Options) -> Path:
    """``--out`` or ``runs/diagnose_<model>``; an earlier diagnosis there is replaced, anything else refused."""
    import shutil

    import yaml

    root = Path(opts.out) if opts.out else Path("runs") / f"diagnose_{opts.model.stem}"
    exp = root / "experiment.yaml"
    if exp.exists():
        desc = str((yaml.safe_load(exp.read_text()) or {}).get("description", ""))
        if not desc.startswith("ablate diagnose"):
            raise DiagnoseError(f"{root} holds another run (not an `ablate diagnose` one); choose another --out")
        shutil.rmtree(root / "arms", ignore_errors=True)
        exp.unlink()
    elif root.exists() and any(root.iterdir()):
        raise DiagnoseError(f"{root} exists and is not an `ablate diagnose` run folder; choose another --out")
    return root


def make_setup(opts: Options) -> Setup:
    """Imports, the model, the data, the loss and the optimizer of a diagnosis (bad input: DiagnoseError)."""
    if opts.steps < 0 or opts.batch <= 0:
        raise DiagnoseError(f"--steps must be >= 0 and --batch > 0 (got {opts.steps}, {opts.batch})")
    import_modules(opts.imports)
    model = load_model(opts.model)
    data = prepare_data(opts.data, opts.batch, model, opts.seed)  # checked once, rebuilt for every run
    loss, metrics = choose_loss(opts.loss, model, data.info.task)
    return Setup(model=model, data=lambda: prepare_data(opts.data, opts.batch, model, opts.seed), loss=loss,
                 metrics=metrics, steps=opts.steps, seed=opts.seed,
                 optimizer=optimizer_factory(opts.optimizer, opts.lr, model))


def run(opts: Options, console: Any, report: Path | None = None, no_report: bool = False) -> int:
    """The whole ``ablate diagnose``: returns its exit code (module docstring)."""
    from ablations.ui import arm_notes, verdict_lines

    try:
        setup = make_setup(opts)
        root = run_folder(opts)
    except DiagnoseError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return EXIT_BAD_INPUT
    label = (f"ablate diagnose {opts.model}: {setup.steps} probed steps on {opts.data} (batch {opts.batch})"
             + (", with --try-fixes" if opts.try_fixes else ""))
    try:
        base = probe_run(copy_model(setup.model), setup, root, "model", "none", label=label)
        tried = []
        if opts.try_fixes:
            lr = getattr(setup.optimizer, "learning_rate", None)
            for name, net, over in variants(setup.model, base.get("verdicts") or [], lr):
                tried.append((name, probe_run(net, setup, root, f"fix={name}", name, over, label=label)))
    except Exception as err:  # the user's model or loss failing to train: say so, no traceback
        console.print(f"[bold red]training failed:[/] {type(err).__name__}: {err}", highlight=False)
        return EXIT_FAILED
    console.print(headline(setup, base, opts), highlight=False)
    for line in arm_notes({**base, "block_rule": base.get("block_rule") or "none"}):
        console.print(f"  [cyan]note[/cyan]: {line}", highlight=False)
    for line in verdict_lines(base.get("verdicts") or [], fixes=6) or ["[green]no verdict[/green]: gradient "
                                                                        "flow looks healthy"]:
        console.print(f"  {line}", highlight=False)
    if opts.try_fixes:
        console.print(comparison_table(root, [("none (as loaded)", base), *tried]))
    console.print(f"run folder: [bold]{root}[/]", highlight=False)
    if not no_report:
        from ablations.report import build_report

        console.print(f"report: [bold]{build_report(root, report)}[/]", highlight=False)
    return EXIT_VERDICTS if base.get("verdicts") else EXIT_HEALTHY


def headline(setup: Setup, s: dict[str, Any], opts: Options) -> str:
    from ablations.ui import fmt, styled

    rule = s.get("block_rule") or "none"
    what = f"{setup.steps} probed steps" if setup.steps else "one batch at the loaded weights (no update)"
    return (f"{styled(s.get('status', '?'))} {setup.model.name}: {s.get('num_params')} parameters, "
            f"{s.get('n_blocks')} blocks (rule: {rule}); {what} on {opts.data}, batch {opts.batch}; "
            f"first/last grad {fmt(s.get('ratio_init'), '.2e')} -> {fmt(s.get('ratio_final'), '.2e')}, decay rate "
            f"{fmt(s.get('decay_rate_final'), '.2f')}, loss {fmt((s.get('final') or {}).get('loss'))}")


def _loss_ends(arm_dir: Path) -> tuple[float, float]:
    import pandas as pd

    try:
        h = pd.read_parquet(arm_dir / "history.parquet").sort_values("step")
    except (OSError, ValueError):
        return math.nan, math.nan
    loss = h["loss"].to_numpy(dtype=float) if len(h) else [math.nan]
    return float(loss[0]), float(loss[-1])


def comparison_table(root: Path, runs: list[tuple[str, dict[str, Any]]]) -> Any:
    """The repair loop's table: per fix the first/last gradient ratio, decay rate and loss, and the verdicts."""
    from rich.table import Table

    from ablations.ui import fmt

    t = Table(title="fixes tried (same data, same steps)")
    for col in ("fix", "first/last grad (init)", "first/last grad (end)", "decay rate (init)", "decay rate (end)",
                "loss (first step)", "loss (last step)", "verdicts"):
        t.add_column(col, justify="left" if col in ("fix", "verdicts") else "right")
    for name, s in runs:
        first, last = _loss_ends(root / "arms" / s["arm_id"])
        t.add_row(name, fmt(s.get("ratio_init"), ".2e"), fmt(s.get("ratio_final"), ".2e"),
                  fmt(s.get("decay_rate_init"), ".2f"), fmt(s.get("decay_rate_final"), ".2f"), fmt(first, ".4g"),
                  fmt(last, ".4g"), ", ".join(v["kind"] for v in s.get("verdicts") or []) or "-")
    return t
