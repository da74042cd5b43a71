"""Experiment configuration: strict pydantic models, grid expansion, ``--set`` overrides.

The config knows nothing about TensorFlow. A YAML file names a base experiment and the ``grid`` of axes to
vary; :meth:`Experiment.arms` expands it into one :class:`Arm` per grid point and seed. Every mistake is
reported as a :class:`ConfigError` that names the file, the dotted key (and its line), what was wrong and
what is allowed.
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ablations import safe_yaml
from zoo.registry import suggest


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


class Strict(BaseModel):
    # extra="forbid": a misspelt key must fail loudly, never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SequenceTransform(Strict):
    """Read images as sequences (Le et al. 2015): pixel by pixel (T = H*W) or row by row (T = H)."""

    mode: Literal["pixels", "rows"] = "pixels"
    permute: Optional[int] = None  # seed of one fixed permutation of the time steps (permuted sequential digits)


class TransformConfig(Strict):
    """Per-example transforms applied after decoding (null: none)."""

    sequence: Optional[SequenceTransform] = None


class DataConfig(Strict):
    """Which TFDS dataset and how to batch it."""

    name: str = "digits"  # any TFDS name; bundled: digits (more with the sequence tasks)
    data_dir: Optional[str] = None  # TFDS data dir; default $GRADZOO_DATA_DIR, else ~/tensorflow_datasets
    download: bool = True  # let TFDS download catalog datasets that are not prepared yet
    train_split: str = "train"
    val_split: Optional[str] = "test"  # null: no validation
    batch_size: int = Field(64, gt=0)  # the global batch (split across replicas by the strategy)
    shuffle_buffer: int = Field(4096, ge=0)
    max_train_examples: Optional[int] = Field(None, gt=0)  # keep the first N training examples
    transform: TransformConfig = TransformConfig()  # e.g. {sequence: {mode: pixels, permute: 0}}


def _refuse_unused(section: BaseModel, used_by: dict[str, tuple[str, ...]]) -> None:
    """Refuses a field away from its default that the chosen ``name`` ignores (an arm identical to the
    default one would be trained and recorded as different)."""
    for field, names in used_by.items():
        value, default = getattr(section, field), type(section).model_fields[field].default
        if section.name not in names and value != default:
            raise PydanticCustomError(
                "unused_option", "{message}",
                {"message": f"'{field}: {value}' has no effect with name '{section.name}' (used by "
                            f"{' and '.join(names)} only); remove it, or bundle it with its name in one grid value",
                 "option": field})


class ScheduleConfig(Strict):
    """A learning-rate schedule over the optimizer steps (``schedule: cosine`` is short for ``{name: cosine}``)."""

    name: Literal["constant", "step", "cosine"] = "constant"
    # Linear warm-up from learning_rate / warmup_steps to learning_rate over the first steps (Goyal et al. 2017);
    # the schedule proper starts after it. With `constant` this is plain linear warm-up.
    warmup_steps: int = Field(0, ge=0)
    # step: multiply the rate by gamma at each milestone, given as fractions of the run's steps
    # (He et al. 2016 divide by 10 at 50% and 75% of training).
    milestones: list[float] = [0.5, 0.75]
    gamma: float = Field(0.1, gt=0, le=1)
    # cosine: decay to min_fraction * learning_rate by the end of the run (Loshchilov & Hutter 2017).
    min_fraction: float = Field(0.0, ge=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError(f"milestones must be increasing fractions of the run in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _used(self) -> "ScheduleConfig":
        _refuse_unused(self, {"milestones": ("step",), "gamma": ("step",), "min_fraction": ("cosine",)})
        return self


class OptimizerConfig(Strict):
    """A Keras optimizer and its gradient clipping (clipping is one of the seed's fixes)."""

    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "sgd"
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd and rmsprop
    nesterov: bool = False  # sgd
    weight_decay: Optional[float] = Field(None, ge=0)
    clipnorm: Optional[float] = Field(None, gt=0)  # per-tensor norm clipping
    clipvalue: Optional[float] = Field(None, gt=0)  # element-wise clipping
    global_clipnorm: Optional[float] = Field(None, gt=0)  # Pascanu et al. 2013: g <- theta g / ||g||
    schedule: ScheduleConfig = ScheduleConfig()  # constant | step | cosine, optional linear warm-up

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_clip(self) -> "OptimizerConfig":
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise ValueError("set at most one of clipnorm and global_clipnorm (Keras allows only one)")
        _refuse_unused(self, {"momentum": ("sgd", "rmsprop"), "nesterov": ("sgd",)})
        return self


class TrainConfig(Strict):
    """How long and how to train each arm."""

    epochs: int = Field(5, gt=0)
    steps_per_epoch: Optional[int] = Field(None, gt=0)  # null: one pass over the training split
    optimizer: OptimizerConfig = OptimizerConfig()
    # auto: from the dataset's task; mse on a classification dataset: against one-hot targets (Cohen et al. 2021)
    loss: Literal["auto", "sparse_categorical_crossentropy", "mse"] = "auto"
    steps_per_execution: int = Field(1, gt=0)  # steps per compiled call (fewer host round trips)
    jit_compile: bool = False
    # Resume inside an arm (ablations/checkpoint.py): save the state every N steps and/or every N epochs
    # (null: never), so a killed arm loses at most one interval.
    checkpoint_steps: Optional[int] = Field(None, gt=0)
    checkpoint_epochs: Optional[int] = Field(1, gt=0)

    @model_validator(mode="after")
    def _whole_executions(self) -> "TrainConfig":
        # Keras runs whole executions: with a fixed number of steps per epoch it would run the remainder of
        # the last execution too (24 steps for 22 at steps_per_execution 4), and epochs would drift.
        if self.steps_per_epoch and self.steps_per_epoch % self.steps_per_execution:
            raise ValueError(f"train.steps_per_epoch ({self.steps_per_epoch}) must be a multiple of "
                             f"train.steps_per_execution ({self.steps_per_execution})")
        if self.checkpoint_steps and self.checkpoint_steps % self.steps_per_execution:
            raise ValueError(f"train.checkpoint_steps ({self.checkpoint_steps}) must be a multiple of "
                             f"train.steps_per_execution ({self.steps_per_execution}): checkpoints are taken "
                             f"between executions")
        return self


class CaptureConfig(Strict):
    """What the probe records inside the compiled train step."""

    every: int = Field(1, gt=0)  # capture every N optimizer steps (step 0, N, 2N, ...)
    params: bool = True  # per-tensor gradient norms (params.parquet)
    # Per-tensor weight and applied-update norms (update_ratio): two more passes over the weights on captured
    # steps, and a pre-update copy only where the update cannot be read from the optimizer's slots
    # (param_norms.update_source); off leaves those columns NaN. Needs params.
    updates: bool = True
    # Per-block histograms of log10|dL/dW| over the block's kernels (grad_hist.parquet): one more pass over the
    # gradients with a log per entry, so off by default.
    histograms: bool = False
    activations: bool = True  # per-block dL/d(pre-activation) and activation statistics (blocks.parquet)
    # Steps between host reads of the on-device ring buffer. auto: as many as keep the ring within 5% of the
    # trainable weights' bytes, 16 to 256 (a small net's 256-step ring outweighed a quarter of its weights).
    drain_every: Union[Literal["auto"], int] = "auto"
    # Instruments by name (ablations/instruments; README "Capture"): true | false | {option: value}, e.g.
    # {grad_hist: {every: 16}}. The four switches above are aliases of the standard ones; an entry here wins.
    instruments: dict[str, Any] = {}

    @field_validator("drain_every", mode="before")
    @classmethod
    def _drain_every(cls, value: Any) -> Any:
        # One message for both forms (pydantic's union would report a failed branch of each).
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise PydanticCustomError("drain_every", "{message}", {
            "message": "not a drain interval: give a number of steps > 0, or auto"})

    @model_validator(mode="after")
    def _instruments(self) -> "CaptureConfig":
        from ablations import instruments as registry

        for name, value in self.instruments.items():
            try:
                opts = registry.parse_options(name, value)
            except ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"capture.instruments.{name}: {problems}. Options of {name}: "
                                 f"{', '.join(registry.get(name).Opts.model_fields) or 'none'}") from None
            except (KeyError, ValueError) as err:
                raise ValueError(f"capture.instruments: {err}") from None
            own = getattr(opts, "every", None)
            if own and own % self.every:
                raise ValueError(f"capture.instruments.{name}.every ({own}) must be a multiple of capture.every "
                                 f"({self.every}): it is taken on captured steps")
        return self


class DiagnoseConfig(Strict):
    """Verdict thresholds (ablations/diagnose.py documents their sources)."""

    vanishing_ratio: float = Field(1e-3, gt=0)  # first/last block gradient below this: vanishing (AUTOTRAINER)
    vanishing_floor: float = Field(1e-8, ge=0)  # any block gradient norm below this: vanishing
    exploding_ratio: float = Field(70.0, gt=1)  # first/last block gradient above this: exploding (AUTOTRAINER)
    stall_ratio: float = Field(1e-3, gt=0)  # update/weight ratio below this: barely learning
    saturated_fraction: float = Field(0.8, gt=0, le=1)  # share of saturated activation entries
    dead_fraction: float = Field(0.4, gt=0, le=1)  # share of units dead for the whole batch
    plateau_improvement: float = Field(0.01, ge=0)  # relative loss improvement per window below this: plateau
    window: int = Field(200, gt=0)  # steps judged at the end of training
    edge_ratio: float = Field(0.9, gt=0)  # median sharpness / stability bound at or above this: edge_of_stability


class RuntimeConfig(Strict):
    """Where and how the arm runs."""

    # auto: TPU if one resolves, else mirrored over several GPUs, else default. See ablations/strategy.py.
    strategy: Literal["auto", "default", "one_device", "mirrored", "multi_worker", "tpu"] = "default"
    device: Optional[str] = None  # one_device: e.g. /gpu:0 (default: first GPU, else the CPU)
    devices: Optional[list[str]] = None  # mirrored: e.g. [/gpu:0, /gpu:1] (default: all GPUs, else all CPUs)
    # Split the CPU into N logical devices (mirrored on CPU, for testing); fixed per process, set at start.
    logical_cpus: Optional[int] = Field(None, ge=1, le=64)
    tpu: Optional[str] = None  # tpu/auto: TPU name or grpc:// address (default: $TPU_NAME, or the TPU VM)
    # Keras dtype policy; mixed_float16 adds loss scaling (statistics are unscaled).
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    deterministic: bool = True  # tf op determinism: same config + seed -> same statistics on CPU
    # Also write TensorBoard event files into each arm folder (arms/<id>/tb): `tensorboard --logdir runs/<name>`.
    tensorboard: bool = False

    @model_validator(mode="after")
    def _device_options(self) -> "RuntimeConfig":
        if self.device is not None and self.strategy != "one_device":
            raise ValueError(f"runtime.device is for strategy one_device (strategy is {self.strategy}); "
                             f"mirrored takes runtime.devices")
        if self.devices is not None and self.strategy != "mirrored":
            raise ValueError(f"runtime.devices is for strategy mirrored (strategy is {self.strategy})")
        return self


class ModelConfig(BaseModel):
    """``arch`` plus that builder's keyword options (checked against its signature, see ``ablate zoo``).

    ``arch`` is a zoo name, ``package.module:function`` (your builder) or ``keras_applications/<Name>``;
    ``file`` loads a saved ``.keras`` model instead (``imports``: modules registering its custom objects).
    See :mod:`zoo.sources`.
    """

    model_config = ConfigDict(extra="allow")
    arch: str = "plain_mlp"
    file: Optional[str] = None  # a saved .keras model (then no arch and no options)
    imports: list[str] = []  # modules to import first (custom objects of `file`, or of your builder)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _file(self) -> "ModelConfig":
        if self.file is not None:
            if self.options() or self.arch != "plain_mlp":
                raise ValueError("model.file loads a saved model: it takes no arch and no builder options "
                                 f"(got {', '.join(['arch'] * (self.arch != 'plain_mlp') + list(self.options()))})")
            if not self.file.endswith(".keras"):
                raise ValueError(f"model.file must be a .keras file (keras.saving), got {self.file!r}")
            if not Path(self.file).exists():
                raise ValueError(f"model.file {self.file!r} does not exist (relative paths are from where "
                                 f"`ablate` runs)")
        return self


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ArmConfig(Strict):
    """One fully resolved arm (what ``arm.yaml`` holds)."""

    experiment: str
    arm_id: str
    values: dict[str, Any]  # the grid values that define this arm
    seed: int
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    capture: CaptureConfig
    diagnose: DiagnoseConfig = DiagnoseConfig()
    runtime: RuntimeConfig

    @model_validator(mode="after")
    def _model_options(self) -> "ArmConfig":
        import zoo

        if self.model.file is not None:
            return self
        try:
            zoo.check_options(self.model.arch, self.model.options())
        except (zoo.BadOptionError, zoo.UnknownNameError) as err:
            option = getattr(err, "option", None)
            raise PydanticCustomError("model_option", "{message}", {
                "message": str(err), "option": f"model.{option}" if option else "model.arch"}) from None
        return self

    @model_validator(mode="after")
    def _xla_needs_nondeterminism(self) -> "ArmConfig":
        # Keras drops jit_compile with only a warning while TF op determinism is on; say so before training.
        if self.train.jit_compile and self.runtime.deterministic:
            raise ValueError("train.jit_compile: true has no effect while runtime.deterministic is true (Keras "
                             "turns XLA off under TF op determinism); set runtime.deterministic: false to use XLA")
        return self


class Arm(BaseModel):
    """An arm: its id and resolved config."""

    id: str
    config: ArmConfig


class SpaceEntry(Strict):
    """One searched value: exactly one of ``uniform``, ``log_uniform``, ``int`` (with ``step``), ``choice``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uniform: Optional[list[float]] = None  # [low, high]
    log_uniform: Optional[list[float]] = None  # [low, high], both > 0 (sampled uniformly in log space)
    int_: Optional[list[builtins.int]] = Field(None, alias="int")  # [low, high] inclusive
    step: Optional[float] = None  # grid step for `int`/`uniform`
    choice: Optional[list[Any]] = None  # a list of values

    @model_validator(mode="after")
    def _one(self) -> "SpaceEntry":
        kinds = [k for k in ("uniform", "log_uniform", "int_", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, int, choice (e.g. {log_uniform: [1e-4, 1]})")
        kind = kinds[0].rstrip("_")
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
            return self
        rng = getattr(self, "int_" if kind == "int" else kind)
        if len(rng) != 2:
            raise ValueError(f"{kind} needs [low, high], got {rng}")
        low, high = rng
        if low >= high:
            raise ValueError(f"{kind}: low {low} must be < high {high}")
        if kind == "log_uniform" and low <= 0:
            raise ValueError(f"log_uniform needs low > 0 (got {low}): a log range cannot include 0")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "log_uniform", "int_", "choice") if getattr(self, k) is not None).rstrip("_")

    @property
    def bounds(self) -> list[Any]:
        return getattr(self, "int_" if self.kind == "int" else self.kind)


# Objectives a search can optimise: Keras epoch metrics (last epoch) and the probe's summary statistics.
OBJECTIVES = {"val_loss": "min", "loss": "min", "val_accuracy": "max", "accuracy": "max",
              "grad_decay_rate": "min", "ratio_final": "max"}


class ObjectiveConfig(Strict):
    name: str
    direction: Literal["min", "max"]


class PruneConfig(Strict):
    """Stop a trial early on a detected pathology (recorded as status `pruned` with the reason)."""

    vanishing_at_init: bool = True  # vanishing verdict on the first captured steps
    non_finite: bool = True  # NaN/Inf loss or gradient (a diverged trial scores the worst value)
    check_steps: int = Field(5, gt=0)  # captured steps judged for `vanishing_at_init`


class SearchConfig(Strict):
    """A keras-tuner search over the experiment (``ablate tune``)."""

    tuner: Literal["random", "bayesian", "hyperband", "grid"] = "random"
    objective: Union[str, ObjectiveConfig] = "val_loss"  # a name from OBJECTIVES, or {name, direction}
    max_trials: int = Field(10, gt=0)
    executions_per_trial: int = Field(1, gt=0)
    space: dict[str, SpaceEntry]  # dotted key -> range or choice
    per_arm: bool = False  # tune separately for every grid point, then run its seeds with the best values
    prune: PruneConfig = PruneConfig()
    seed: int = 0  # the oracle's seed

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: Any) -> Any:
        name = v if isinstance(v, str) else v.name
        if name not in OBJECTIVES:
            raise ValueError(f"objective '{name}' is not recorded.{suggest(name, list(OBJECTIVES))} "
                             f"Recorded objectives: {', '.join(OBJECTIVES)}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        if not v:
            raise ValueError("search.space is empty: name at least one key to search")
        return v

    def objective_spec(self) -> tuple[str, str]:
        """``(name, direction)``."""
        if isinstance(self.objective, str):
            return self.objective, OBJECTIVES[self.objective]
        return self.objective.name, self.objective.direction


class PointSettings(Strict):
    """Settings for the arms of some grid points (``per_point``): ``point`` names grid values (a subset of the
    axes), ``set`` the dotted keys to change in every arm at such a point (ids stay the grid's)."""

    point: dict[str, Any]
    set: dict[str, Any]


_NOT_VARIED = ("name", "description", "grid", "seeds", "search", "per_point", "max_arms", "claim")
SEED_MAX = 2**32 - 1  # NumPy and Keras seeds are unsigned 32-bit
DEFAULT_MAX_ARMS = 10_000

# ------------------------------------------------------------------------------------- claims (reproduce)
# A `claim:` section makes an experiment a check of a published result (`ablate reproduce`, configs/papers/).
# Its expressions are parsed by ablations.claims (a small safe language over the stored tables, no TensorFlow)
# and checked against the experiment's arms in parse_experiment (_check_claim), so errors name file:line.


class ClaimPaper(Strict):
    """The paper a claim comes from."""

    authors: str = Field(min_length=1)
    year: int = Field(ge=1900, le=2100)
    title: str = Field(min_length=1)


class ClaimTolerance(Strict):
    """Where a claim's tolerance comes from (never widened to make a claim pass)."""

    # paper: the paper's own spread or stated range; seed_spread: the seed-to-seed spread measured here;
    # theory: an exact or mean-field prediction with its numerical error; bound: an inequality (no spread).
    source: Literal["paper", "seed_spread", "theory", "bound"]
    note: str = Field(min_length=1)  # the numbers behind it (e.g. "3 sd over seeds 0-4: 0.012")


class ClaimFigure(Strict):
    """The small figure drawn beside the claim's row, from the stored tables (PNG + CSV)."""

    kind: Literal["depth", "curve", "time", "values"] = "values"  # vs block depth | vs step/epoch | vs t | bars
    table: Optional[str] = None  # depth: blocks | kernels | params; curve: history | epochs; time: time_grads
    column: Optional[str] = None
    step: Union[int, Literal["first", "last"]] = "first"  # depth and time figures
    logy: bool = True
    relative: bool = False  # depth / time figures: divide by the value at the last block / step (as ratio() does)
    arms: Optional[str] = None  # arm selector of the arms drawn (default: all)
    ref: dict[str, Union[str, float]] = {}  # horizontal reference lines: label -> expression

    @model_validator(mode="after")
    def _table(self) -> "ClaimFigure":
        need = {"depth": ("blocks", "kernels", "params"), "curve": ("history", "epochs"), "time": ("time_grads",)}
        if self.kind in need and (self.table not in need[self.kind] or not self.column):
            raise ValueError(f"figure kind {self.kind} needs table one of {', '.join(need[self.kind])} and a column")
        return self


class ClaimConfig(Strict):
    """A published claim, what is measured here and when it holds (README: Reproducing the literature)."""

    paper: ClaimPaper
    statement: str = Field(min_length=1)  # the claim in one sentence
    setup: str = Field(min_length=1)  # the paper's setup
    published: str = Field(min_length=1)  # the paper's number(s) as published
    kind: Literal["init", "trained", "theory"]  # init: one step, statistics of step 0; theory: nothing trains
    quick: bool = False  # part of `ablate reproduce --quick`
    requires: list[str] = []  # instruments the claim needs (could not run until they are registered)
    measure: dict[str, Union[str, float]]  # name -> expression, in order; later ones may use earlier names
    show: Optional[list[str]] = None  # measures shown as "ours" (default: all)
    holds: str  # a condition over the measures
    expected: str = Field(min_length=1)  # the expected direction/value and tolerance, in words
    tolerance: ClaimTolerance
    differs: str = ""  # what differs from the paper (scale, data, optimiser)
    figure: ClaimFigure = ClaimFigure()

    @field_validator("measure")
    @classmethod
    def _measure(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("claim.measure is empty: name at least one quantity")
        reserved = _claim_reserved()
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or k in reserved]
        if bad:
            raise ValueError(f"measure name '{bad[0]}' must be an identifier and not a function or constant name")
        return {k: str(x) for k, x in v.items()}

    def compile(self, extra_tables: tuple[str, ...] = ()) -> dict[str, Any]:
        """Parses every expression; returns ``{dotted key: ablations.claims.Expression}`` in evaluation order.

        Raises:
            ValueError: ``"<dotted key>: <problem>"`` for the first expression that is not allowed.
        """
        from ablations import claims

        out: dict[str, Any] = {}
        tables = tuple(self.requires) + tuple(extra_tables)
        names: list[str] = []
        for key, text in [*((f"measure.{k}", x) for k, x in self.measure.items()), ("holds", self.holds),
                          *((f"figure.ref.{k}", x) for k, x in self.figure.ref.items())]:
            try:
                out[key] = claims.parse(str(text), names, tables)
            except claims.ExpressionError as err:
                raise ValueError(f"claim.{key}: {err}") from None
            if key.startswith("measure."):
                names.append(key.split(".", 1)[1])
        for name in self.show or []:
            if name not in self.measure:
                raise ValueError(f"claim.show: '{name}' is not a measure.{suggest(name, list(self.measure))}")
        if self.figure.table and self.figure.table not in tables:
            try:  # the figure's table and column must be stored ones
                claims.parse(f'column("{self.figure.table}", "{self.figure.column}")')
            except claims.ExpressionError as err:
                raise ValueError(f"claim.figure: {err}") from None
        return out


def _claim_reserved() -> set[str]:
    """Names a measure may not take: the claim language's functions and constants (imported lazily)."""
    from ablations.claims import CONSTANTS, FUNCTIONS

    return set(FUNCTIONS) | set(CONSTANTS)


def _check_claim(exp: "Experiment", where: "_Where") -> None:
    """Expressions parse, every arm selector matches an arm, init/theory claims train one step only."""
    from ablations.claims import flatten, matches, parse_selector

    claim = exp.claim

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{where.at(key)}: {msg}")  # file:line of the key (or of its nearest parent)

    try:
        parsed = claim.compile()
    except ValueError as err:
        fail(str(err).split(":", 1)[0], str(err))
    configs = [flatten({**a.config.model_dump(mode="json", exclude={"values", "experiment", "arm_id"})})
               for a in exp.arms()]
    keys = set().union(*configs)
    for key, expr in parsed.items():
        for sel in expr.selectors:
            want = parse_selector(sel)
            unknown = [k for k in want if k not in keys]
            if unknown:
                fail(f"claim.{key}", f"claim.{key}: arm selector '{sel}': no arm has the key '{unknown[0]}'."
                                     f"{suggest(unknown[0], sorted(keys))}")
            if not any(matches(c, want) for c in configs):
                fail(f"claim.{key}", f"claim.{key}: arm selector '{sel}' matches no arm of this experiment")
    if claim.kind in ("init", "theory"):
        long = [a.id for a in exp.arms() if a.config.train.epochs != 1 or a.config.train.steps_per_epoch != 1]
        if long:
            fail("claim.kind", f"claim.kind {claim.kind}: set train.epochs: 1 and train.steps_per_epoch: 1 (an "
                               f"{claim.kind} claim reads step 0 only; arm {long[0]} trains longer)")


class Experiment(Strict):
    """A YAML experiment: a base config, the axes to vary and the seeds."""

    name: str = Field(pattern=_NAME, max_length=255)  # becomes the run folder name: runs/<name>
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    capture: CaptureConfig = CaptureConfig()
    diagnose: DiagnoseConfig = DiagnoseConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    # Refuse grids larger than this (a typo such as `seeds: 1000000` would otherwise expand for minutes).
    max_arms: int = Field(DEFAULT_MAX_ARMS, gt=0)
    grid: dict[str, list[Any]] = {}  # dotted key -> values; arms are the cartesian product
    per_point: list[PointSettings] = []  # settings for some grid points (ablate tune's per_arm best.yaml)
    seeds: list[int] = [0]  # every grid point runs once per seed; an integer n means 0..n-1
    search: Optional[SearchConfig] = None  # keras-tuner search for `ablate tune`
    _arms: Optional[list[Arm]] = PrivateAttr(None)
    _where: Any = PrivateAttr(None)  # how arm errors are located (file lines, --set items), from parsing
    claim: Optional[ClaimConfig] = None  # a published claim this experiment checks (`ablate reproduce`)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_count(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v <= 0:
                raise ValueError("an integer number of seeds must be > 0")
            cap = info.data.get("max_arms", DEFAULT_MAX_ARMS)
            if v > cap:
                raise ValueError(f"{v:,} seeds are more than max_arms = {cap:,}; raise the cap to run them "
                                 f"(max_arms: N in the config, or --set max_arms=N)")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_list(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds is empty: give at least one seed, e.g. [0] or an integer count")
        for seed in v:
            if not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seed {seed} is out of range: seeds are integers from 0 to {SEED_MAX}")
        twice = sorted({s for s in v if v.count(s) > 1})
        if twice:
            raise ValueError(f"seed {twice[0]} is listed twice: each seed is one replicate, so a repeat would be "
                             f"counted as a second, independent one")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid axis '{key}' has no values")
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"grid axis '{key}' is not a dotted config key (e.g. model.depth)")
            if key.split(".")[0] in _NOT_VARIED:
                raise ValueError(f"grid axis '{key}' cannot be varied (use seeds for seeds)")
        return grid

    @model_validator(mode="after")
    def _bounded(self) -> "Experiment":
        n = math.prod(len(v) for v in self.grid.values()) * len(self.seeds)
        if n > self.max_arms:
            sizes = " x ".join([f"{len(v)} {k}" for k, v in self.grid.items()] + [f"{len(self.seeds)} seeds"])
            raise ValueError(f"the grid expands to {n:,} arms ({sizes}), more than max_arms = {self.max_arms:,}; "
                             f"shrink the grid, or raise the cap (max_arms: N in the config, or --set max_arms=N)")
        for i, entry in enumerate(self.per_point):
            for key, value in entry.point.items():
                if key not in self.grid:
                    raise ValueError(f"per_point[{i}].point: '{key}' is not a grid axis "
                                     f"(axes: {', '.join(self.grid) or 'none'})")
                if _canon(value) not in {_canon(v) for v in self.grid[key]}:
                    raise ValueError(f"per_point[{i}].point: {value!r} is not a value of grid axis '{key}'")
            for key in entry.set:
                if key.split(".")[0] in _NOT_VARIED or key in self.grid:
                    raise ValueError(f"per_point[{i}].set: '{key}' cannot be set per point (grid axes, seeds and "
                                     f"names are fixed by the grid)")
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_") and self.__pydantic_private__:
            self.__pydantic_private__["_arms"] = None  # a changed field changes the arms

    def base_dict(self) -> dict[str, Any]:
        """The base config (every section, no grid): what each arm starts from."""
        return self.model_dump(mode="json", exclude={"grid", "seeds", "search", "per_point", "max_arms", "claim"})

    def arms(self) -> list[Arm]:
        """The grid times the seeds as arms (grid order, seeds innermost); expanded once per experiment.

        Raises:
            ConfigError: an arm's config is invalid (its id and, where known, the file line are named).
        """
        if self._arms is None:
            self._arms = _expand(self, self._where or _Where())
        return list(self._arms)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _expand(exp: Experiment, where: "_Where") -> list[Arm]:
    keys = list(exp.grid)
    shorts = short_keys(keys)
    base = exp.base_dict()
    name = base.pop("name")
    base.pop("description")
    arms: list[Arm] = []
    seen: set[str] = set()
    for combo in itertools.product(*(exp.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        point = copy.deepcopy(base)
        for key, value in values.items():
            try:
                set_path(point, key, copy.deepcopy(value))
            except ConfigError as err:
                raise ConfigError(f"{where.at('grid.' + key)}: grid axis '{key}': {err}") from None
        for i, entry in enumerate(exp.per_point):
            if all(_canon(values.get(k)) == _canon(v) for k, v in entry.point.items()):
                for key, value in entry.set.items():
                    try:
                        set_path(point, key, copy.deepcopy(value))
                    except ConfigError as err:
                        raise ConfigError(f"{where.at('per_point')}: per_point[{i}].set: {err}") from None
        label = ",".join(f"{shorts[k]}={slug(v)}" for k, v in values.items())
        for seed in exp.seeds:
            arm_id = _limit(f"{label},seed={seed}" if label else f"seed={seed}")
            if arm_id in seen:  # two values that slug alike: keep ids unique and stable
                arm_id = _limit(arm_id + "~" + _digest(_canon(values)))
            seen.add(arm_id)
            try:
                cfg = ArmConfig(experiment=name, arm_id=arm_id, values=values, seed=seed, **copy.deepcopy(point))
            except ValidationError as err:
                raise ConfigError(_format_errors(err, where, arm_id=arm_id, values=values)) from None
            arms.append(Arm(id=arm_id, config=cfg))
    return arms


# ----------------------------------------------------------------------------------------------- loading


class _Where:
    """Where a dotted key was written, for error messages: the file and line, or the ``--set`` item."""

    def __init__(self, source: str = "<config>", lines: dict[str, int] | None = None,
                 set_items: dict[str, str] | None = None):
        self.source, self.lines, self.set_items = source, lines or {}, set_items or {}

    def set_item(self, path: str) -> str | None:
        for key, item in self.set_items.items():
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return item
        return None

    def at(self, path: str) -> str:
        """``file:line`` of ``path`` (or of its nearest written parent), or ``--set 'item'``."""
        plain = path[len("grid."):] if path.startswith("grid.") else path
        item = self.set_item(plain)
        if item is not None:
            return f"--set '{item}'"
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:n]))
            if line:
                return f"{self.source}:{line}"
        return self.source


def read_config_text(path: Path) -> str:
    """The text of a config file (UTF-8); a clear :class:`ConfigError` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          f"save the config as UTF-8") from None


def load_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parses config YAML safely (bounded aliases and nesting, duplicate keys refused); see :mod:`safe_yaml`."""
    try:
        return safe_yaml.load(text, source)
    except safe_yaml.YAMLInputError as err:
        raise ConfigError(str(err)) from None


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Reads, overrides and validates a YAML experiment; raises :class:`ConfigError` on any mistake."""
    path = Path(path)
    raw, lines = load_yaml(read_config_text(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, data, model, ...)")
    raw, set_items = _apply_overrides(raw, overrides)
    return parse_experiment(raw, source=str(path), lines=lines, set_items=set_items)


def parse_experiment(raw: dict[str, Any], source: str = "<config>", lines: dict[str, int] | None = None,
                     set_items: dict[str, str] | None = None) -> Experiment:
    """Validates a config dict and expands its arms (once), so every grid value is checked up front.

    Args:
        raw: the config as a dict.
        source: its file name, for messages.
        lines: ``{dotted key: line}`` of the file, for messages.
        set_items: ``{dotted key: '--set' item}`` of the overrides applied, so their errors name them.
    """
    where = _Where(source, lines, set_items)
    try:
        exp = Experiment(**raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, where)) from None
    except (TypeError, RecursionError) as err:
        raise ConfigError(f"{source}: {type(err).__name__}: {err}") from None
    exp._where = where
    exp.arms()
    if exp.search is not None:
        _check_space(exp, where)
    if exp.claim is not None:
        _check_claim(exp, where)
    return exp


def _check_space(exp: Experiment, where: _Where) -> None:
    """Every searched key must be a real config key taking the searched values (checked with the bounds)."""
    for key, entry in exp.search.space.items():
        if key.split(".")[0] in _NOT_VARIED:
            raise ConfigError(f"{where.at('search.space.' + key)}: search.space '{key}' cannot be searched")
        if exp.search.per_arm and key in exp.grid:
            raise ConfigError(f"{where.at('search.space.' + key)}: search.space '{key}' is also a grid axis; with "
                              f"per_arm: true every grid point fixes it, so search other keys or drop the axis")
        samples = entry.choice if entry.kind == "choice" else entry.bounds
        for value in samples:
            raw = exp.base_dict()
            try:
                set_path(raw, key, copy.deepcopy(value))
            except ConfigError as err:
                raise ConfigError(f"{where.source}: search.space '{key}': {err}") from None
            raw.pop("name"), raw.pop("description")
            try:
                ArmConfig(experiment=exp.name, arm_id="check", values={}, seed=0, **raw)
            except ValidationError as err:
                inner = _Where(f"{where.source}: search.space '{key}' = {value!r}")
                raise ConfigError(_format_errors(err, inner)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Applies ``key.path=value`` overrides (values parsed as YAML).

    A key that is also a grid axis pins that axis (``--set model.depth=2`` makes every arm depth 2; a list
    value replaces the axis); ``grid.<key>=[...]`` sets an axis; ``seeds=1`` runs seed 0 only.
    """
    return _apply_overrides(raw, overrides)[0]


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`apply_overrides`, also returning ``{dotted key: item}`` so errors can name the ``--set``."""
    raw = copy.deepcopy(raw)
    origins: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected key.path=value, e.g. train.epochs=1")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set '{item}': '{key}' is not a dotted config key, e.g. train.epochs=1")
        if not text.strip():
            raise ConfigError(f"--set '{item}': no value after '='; write {key}=null for null or {key}=\"\" for an "
                              f"empty string")
        try:
            value, _ = safe_yaml.load(text, "--set")
        except safe_yaml.YAMLInputError as err:
            raise ConfigError(f"--set '{item}': the value is not valid YAML ({err.detail})") from None
        grid = raw.setdefault("grid", {}) if isinstance(raw.get("grid", {}), dict) else {}
        if key.startswith("grid."):
            grid[key[len("grid."):]] = value if isinstance(value, list) else [value]
            origins[key[len("grid."):]] = item
        elif key in grid:
            grid[key] = value if isinstance(value, list) else [value]
            origins[key] = item
        else:
            try:
                set_path(raw, key, value)
            except ConfigError as err:
                raise ConfigError(f"--set '{item}': {err}") from None
            origins[key] = item
        if not raw.get("grid"):
            raw.pop("grid", None)
    return raw, origins


def dump_yaml(data: Any) -> str:
    """YAML text for configs written into run folders (keys in insertion order)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------- helpers


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets ``raw[a][b][c] = value`` for ``a.b.c``; a mapping value is merged into an existing section, so a
    grid axis can bundle settings (``model: [{arch: plain_mlp}, {arch: resnet_mlp, branch_scale: 0.5}]``)."""
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
        node = nxt
    old = node.get(parts[-1])
    node[parts[-1]] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def short_keys(keys: list[str]) -> dict[str, str]:
    """Id prefixes for grid keys: the last component unless ambiguous, as a safe file-name fragment."""
    last = [k.split(".")[-1] for k in keys]
    return {k: _safe_key(s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe_key(key: str) -> str:
    # Ids are folder names: a key never contributes a path separator, a leading dot or anything to quote.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.") or "_"


def value_label(value: Any) -> str:
    """Short text for a grid value: a bundle (mapping) shows its values joined by '+'."""
    if isinstance(value, dict):
        return "+".join(value_label(v) for v in value.values())
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def slug(value: Any) -> str:
    """A grid value as a file-name fragment (``[A-Za-z0-9._+-]``)."""
    text = value_label(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "_"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _limit(arm_id: str, n: int = 120) -> str:
    # Well below the 255-byte limit of a file name (ids are ASCII), leaving room for temp-file prefixes.
    return arm_id if len(arm_id) <= n else arm_id[: n - 9] + "~" + _digest(arm_id)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """Allowed keys of the section at ``loc`` (a path of field names from the Experiment)."""
    model: Any = Experiment
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return list(model.model_fields)


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[: n - 3]}... ({len(text)} characters)"


def _grid_key(path: str, values: dict[str, Any]) -> str | None:
    """The grid axis whose value of this arm set ``path`` (a bundle sets the keys it names), or None."""
    for key, value in values.items():
        if path == key:
            return key
        if path.startswith(key + "."):
            node = value
            for part in path[len(key) + 1:].split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                return key
    return None


def _format_errors(err: ValidationError, where: _Where, arm_id: str | None = None,
                   values: dict[str, Any] | None = None) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        ctx = e.get("ctx") or {}
        path = ".".join(str(p) for p in loc + ((ctx["option"],) if "option" in ctx else ()))
        grid_key = _grid_key(path, values or {})
        at = where.at(("grid." + grid_key) if grid_key and not where.set_item(path) else path)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1]) or []
            msg = f"unknown key '{path}'.{suggest(str(loc[-1]), allowed)} Allowed keys"
            msg += f" under '{'.'.join(map(str, loc[:-1]))}'" if len(loc) > 1 else ""
            msg += f": {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = f"'{path}' is required"
        elif e["type"] in ("model_option", "unused_option"):
            msg = f"'{path}': {ctx['message']}"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f" (got {_short(got)})"
            text = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's message
            msg = f"'{path}': {text}{shown}" if path else f"{text}{shown}"
        if grid_key:
            msg += " [value from grid]"
        msgs.append(f"{at}: {f'arm {arm_id}: ' if arm_id else ''}{msg}")
    return "\n".join(msgs)
