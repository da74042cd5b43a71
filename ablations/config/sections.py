"""The sections of one arm's config (data, model, train, capture, diagnose, runtime) and the resolved arm.

Each field is commented with its reason; validators refuse settings that would be silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ablations.config.base import Strict, _refuse_unused


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
    # (instruments/update_rules.py); off leaves those columns NaN. Needs params.
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
