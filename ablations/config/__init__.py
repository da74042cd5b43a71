"""Experiment configuration: strict pydantic models, grid expansion, ``--set`` overrides.

The config knows nothing about TensorFlow. A YAML file names a base experiment and the ``grid`` of axes to
vary; :meth:`Experiment.arms` expands it into one :class:`Arm` per grid point and seed. Every mistake is
reported as a :class:`ConfigError` that names the file, the dotted key (and its line), what was wrong and
what is allowed.

One concern per module: ``base`` (the error and strict parsing), ``sections`` (one arm's sections),
``search`` (``ablate tune``), ``claim`` (``ablate reproduce``), ``experiment`` (the grid and its arms),
``keys`` (dotted keys, arm ids), ``errors`` (locating and wording mistakes), ``loading`` (YAML and ``--set``).
"""

from ablations.config.base import ConfigError, Strict
from ablations.config.claim import ClaimConfig, ClaimFigure, ClaimPaper, ClaimTolerance
from ablations.config.experiment import DEFAULT_MAX_ARMS, SEED_MAX, Experiment
from ablations.config.keys import set_path, short_keys, slug, value_label
from ablations.config.loading import (apply_overrides, dump_yaml, load_experiment, load_yaml, parse_experiment,
                                      read_config_text)
from ablations.config.search import (OBJECTIVES, ObjectiveConfig, PointSettings, PruneConfig, SearchConfig,
                                     SpaceEntry)
from ablations.config.sections import (Arm, ArmConfig, CaptureConfig, DataConfig, DiagnoseConfig, ModelConfig,
                                       OptimizerConfig, RuntimeConfig, ScheduleConfig, SequenceTransform,
                                       TrainConfig, TransformConfig)

__all__ = [
    "Arm", "ArmConfig", "CaptureConfig", "ClaimConfig", "ClaimFigure", "ClaimPaper", "ClaimTolerance", "ConfigError",
    "DEFAULT_MAX_ARMS", "DataConfig", "DiagnoseConfig", "Experiment", "ModelConfig", "OBJECTIVES", "ObjectiveConfig",
    "OptimizerConfig", "PointSettings", "PruneConfig", "RuntimeConfig", "SEED_MAX", "ScheduleConfig", "SearchConfig",
    "SequenceTransform", "SpaceEntry", "Strict", "TrainConfig", "TransformConfig", "apply_overrides", "dump_yaml",
    "load_experiment", "load_yaml", "parse_experiment", "read_config_text", "set_path", "short_keys", "slug",
    "value_label",
]
