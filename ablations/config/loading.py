"""Reading a YAML experiment: safe parsing, ``--set`` overrides, validation and the search-space check."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ablations import safe_yaml
from ablations.config.base import ConfigError
from ablations.config.errors import Where, format_errors
from ablations.config.experiment import NOT_VARIED, Experiment
from ablations.config.keys import set_path
from ablations.config.sections import ArmConfig
from zoo.registry import suggest


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
    where = Where(source, lines, set_items)
    try:
        exp = Experiment(**raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, where, Experiment)) from None
    except (TypeError, RecursionError) as err:
        raise ConfigError(f"{source}: {type(err).__name__}: {err}") from None
    exp._where = where
    exp.arms()
    if exp.search is not None:
        _check_space(exp, where)
    if exp.claim is not None:
        _check_claim(exp, where)
    return exp


def _check_space(exp: Experiment, where: Where) -> None:
    """Every searched key must be a real config key taking the searched values (checked with the bounds)."""
    for key, entry in exp.search.space.items():
        if key.split(".")[0] in NOT_VARIED:
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
                inner = Where(f"{where.source}: search.space '{key}' = {value!r}")
                raise ConfigError(format_errors(err, inner, Experiment)) from None


def _check_claim(exp: Experiment, where: Where) -> None:
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


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Applies ``key.path=value`` overrides (values parsed as YAML).

    A key that is also a grid axis pins that axis (``--set model.depth=2`` makes every arm depth 2; a list
    value replaces the axis); ``grid.<key>=[...]`` sets an axis; ``seeds=1`` runs seed 0 only.
    """
    return _apply_overrides(raw, overrides)[0]


def _apply_overrides(raw: dict[str, Any],
                     overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
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
