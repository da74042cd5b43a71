"""The experiment: a base config, the grid of axes to vary and the seeds, expanded into arms."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Optional

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from ablations.config.base import ConfigError, Strict
from ablations.config.claim import ClaimConfig
from ablations.config.errors import Where, format_errors
from ablations.config.keys import canon, digest, limit, set_path, short_keys, slug
from ablations.config.search import PointSettings, SearchConfig
from ablations.config.sections import (Arm, ArmConfig, CaptureConfig, DataConfig, DiagnoseConfig, ModelConfig,
                                       RuntimeConfig, TrainConfig)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NOT_VARIED = ("name", "description", "grid", "seeds", "search", "per_point", "max_arms", "claim")
SEED_MAX = 2**32 - 1  # NumPy and Keras seeds are unsigned 32-bit
DEFAULT_MAX_ARMS = 10_000


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
            if key.split(".")[0] in NOT_VARIED:
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
                if canon(value) not in {canon(v) for v in self.grid[key]}:
                    raise ValueError(f"per_point[{i}].point: {value!r} is not a value of grid axis '{key}'")
            for key in entry.set:
                if key.split(".")[0] in NOT_VARIED or key in self.grid:
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
            self._arms = _expand(self, self._where or Where())
        return list(self._arms)


def _expand(exp: Experiment, where: Where) -> list[Arm]:
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
            if all(canon(values.get(k)) == canon(v) for k, v in entry.point.items()):
                for key, value in entry.set.items():
                    try:
                        set_path(point, key, copy.deepcopy(value))
                    except ConfigError as err:
                        raise ConfigError(f"{where.at('per_point')}: per_point[{i}].set: {err}") from None
        label = ",".join(f"{shorts[k]}={slug(v)}" for k, v in values.items())
        for seed in exp.seeds:
            arm_id = limit(f"{label},seed={seed}" if label else f"seed={seed}")
            if arm_id in seen:  # two values that slug alike: keep ids unique and stable
                arm_id = limit(arm_id + "~" + digest(canon(values)))
            seen.add(arm_id)
            try:
                cfg = ArmConfig(experiment=name, arm_id=arm_id, values=values, seed=seed, **copy.deepcopy(point))
            except ValidationError as err:
                raise ConfigError(format_errors(err, where, Experiment, arm_id=arm_id, values=values)) from None
            arms.append(Arm(id=arm_id, config=cfg))
    return arms
