"""The ``search:`` section (``ablate tune``) and ``per_point`` settings."""

from __future__ import annotations

import builtins
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from ablations.config.base import Strict
from zoo.registry import suggest


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
