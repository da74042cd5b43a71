"""The claim expression language: statistics of a run folder's stored tables, never free Python.

A claim (``claim:`` in ``configs/papers/*.yaml``) names quantities as expressions and states when it holds::

    measure:
      pre: ratio("blocks", "act_grad_norm", arm="model.initializer=standard")
      factor: pre ** (2 / 4)
    holds: abs(factor - 1/3) <= 0.05

Expressions use Python's syntax, parsed with :mod:`ast`, and only these parts of it: numbers, strings,
``True``/``False``/``None``, lists, ``+ - * / ** %``, unary ``-``/``not``, comparisons (chains too),
``and``/``or``, names of earlier measures (and ``pi``, ``e``, ``inf``), and calls of the functions in
:data:`FUNCTIONS`. Attribute access, subscripts, lambdas, comprehensions, keyword-splats and any other name
or function are rejected when the config is loaded, with the column of the offending part.

Values are numbers, strings or 1-D NumPy arrays. Selectors return one value per matched arm (seeds in seed
order) or one per row; arithmetic is element-wise with broadcasting (arrays over the same arms pair up by
seed). A comparison involving NaN stops the evaluation (the claim "could not run": a NaN is a failed
measurement, not evidence); a condition that is an array holds when every element holds.

Tables (:data:`TABLES`) are the run folder's Parquet tables (ARCHITECTURE.md section 4) plus ``kernels``:
the rows of ``params`` that hold each block's first linear kernel (the per-block weight-gradient series of
``summary.json``'s ``ratio_init``). Arm selectors are strings ``"key=value, key=value"`` matched against
each arm's resolved config (``arm.yaml``, dotted keys such as ``model.activation`` or
``train.optimizer.global_clipnorm``, and ``seed``); values are read as YAML.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np
import yaml

from zoo.registry import suggest

if TYPE_CHECKING:
    import pandas as pd

# ----------------------------------------------------------------------------------------------- schema

_STEP = ("step", "epoch")
TABLES: dict[str, tuple[str, ...]] = {
    "history": (*_STEP, "loss", "global_grad_norm", "lr", "grad_decay_rate"),
    "epochs": ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "mse", "val_mse"),
    "params": (*_STEP, "depth", "block", "layer", "param", "role", "size", "grad_norm", "weight_norm",
               "update_norm", "update_ratio", "init_distance", "init_distance_ratio"),
    "blocks": (*_STEP, "depth", "block", "act_grad_norm", "act_mean", "act_std", "act_saturation", "act_dead",
               "branch_ratio", "gate_mean", "alpha", "active"),
    "time_grads": (*_STEP, "layer", "depth", "t", "act_grad_norm"),
    "gates": ("layer", "depth", "gate", "mean", "frac_low", "frac_high", "when"),
    "grad_hist": (*_STEP, "depth", "block", "bin", "log10_lo", "log10_hi", "count", "fraction"),
    "per_example": (*_STEP, "depth", "block", "tensors", "coverage", "mean_norm", "std_norm", "trace_sigma",
                    "grad_sq", "b_simple", "snr"),
    "curvature": (*_STEP, "sharpness", "sharpness_rel_change", "sharpness_residual", "hessian_trace",
                  "hessian_trace_stderr", "lr", "stability_bound", "preconditioned_sharpness", "edge_ratio"),
    # capture.instruments.jacobian (snapshots at init, every N steps, at the end: column `when`)
    "jacobian": (*_STEP, "when", "example", "method", "n_in", "n_out", "mean_sq", "var_sq", "rel_var_sq", "sv_max",
                 "sv_min"),
    "jacobian_sv": (*_STEP, "when", "example", "rank", "singular_value"),
    "jacobian_blocks": (*_STEP, "when", "depth", "block", "mean_sq"),
}
TABLES["kernels"] = TABLES["params"]  # a view of params: each block's first linear (or recurrent input) kernel
SUMMARY_KEYS = ("status", "steps", "epochs_run", "num_params", "baseline_loss", "ratio_init", "ratio_final",
                "decay_rate_init", "decay_rate_final", "wall_time_s", "diverged_at_step", "lost_captures")
CONSTANTS = {"pi": math.pi, "e": math.e, "inf": math.inf}
REDUCERS = ("mean", "median", "sum", "min", "max", "first", "last", "norm", "count", "std")


class ExpressionError(ValueError):
    """An expression that is not allowed or not well formed (reported when the config is loaded)."""


class NotMeasurable(RuntimeError):
    """The stored tables cannot give the value (missing arm, table, column or rows; NaN): "could not run"."""


# ----------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class ArmRecord:
    """One arm as the evaluator sees it: its id, folder, resolved config (flattened) and summary."""

    id: str
    dir: Path
    config: dict[str, Any]
    summary: Optional[dict[str, Any]]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_selector(text: str) -> dict[str, Any]:
    """``"model.depth=16, seed=0"`` -> ``{"model.depth": 16, "seed": 0}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ExpressionError(f"arm selector '{text}': '{part}' is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            out[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise ExpressionError(f"arm selector '{text}': the value of {key} is not valid YAML") from None
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def matches(config: dict[str, Any], selector: dict[str, Any]) -> bool:
    """True when every key of ``selector`` has that value in the flattened ``config``."""
    return all(k in config and _same(config[k], v) for k, v in selector.items())


class RunSource:
    """The arms of one claim's run folder, their summaries and (lazily read, cached) tables.

    Args:
        root: the run folder (``runs/<experiment>``).
        arms: the claim's arms as ``(arm_id, resolved config dict)``; default: every arm folder with an
            ``arm.yaml``. Arms of the folder that the experiment does not have are never read.
    """

    def __init__(self, root: Path, arms: Optional[Iterable[tuple[str, dict[str, Any]]]] = None):
        from ablations import store

        self.root = Path(root)
        if arms is None:
            arms = [(d.name, yaml.safe_load((d / "arm.yaml").read_text()) or {})
                    for d in sorted((self.root / "arms").glob("*")) if (d / "arm.yaml").exists()]
        self.arms = []
        for arm_id, cfg in arms:
            d = self.root / "arms" / arm_id
            flat = flatten({k: v for k, v in cfg.items() if k not in ("values", "experiment", "arm_id")})
            self.arms.append(ArmRecord(arm_id, d, flat, store.read_summary(d)))
        self._tables: dict[tuple[str, str], pd.DataFrame] = {}

    def match(self, selector: Optional[str]) -> list[ArmRecord]:
        """The arms matching ``selector`` (all for None), in seed order; each must have a usable result."""
        sel = parse_selector(selector) if selector else {}
        found = sorted((a for a in self.arms if matches(a.config, sel)), key=lambda a: a.config.get("seed", 0))
        if not found:
            raise NotMeasurable(f"no arm matches '{selector}'")
        for a in found:
            if a.summary is None:
                raise NotMeasurable(f"arm {a.id} has no result (not run yet, or interrupted)")
            if a.summary.get("status") == "failed":
                raise NotMeasurable(f"arm {a.id} failed: {a.summary.get('error') or 'see its error.txt'}")
        return found

    def table(self, arm: ArmRecord, name: str) -> pd.DataFrame:
        key = (arm.id, name)
        if key not in self._tables:
            f = arm.dir / f"{'params' if name == 'kernels' else name}.parquet"
            if not f.exists():
                raise NotMeasurable(f"arm {arm.id} has no {f.name}")
            import pandas as pd  # lazily: `ablate validate` of a claim config needs no pandas

            try:
                df = pd.read_parquet(f)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise NotMeasurable(f"arm {arm.id}: {f.name} is damaged ({type(err).__name__})") from None
            self._tables[key] = _kernels(df) if name == "kernels" else df
        return self._tables[key]


def _kernels(params: pd.DataFrame) -> pd.DataFrame:
    """Each block's first linear (or recurrent input) kernel: the rule of the summary's ``ratio_init``."""
    if params.empty:
        return params
    return params[(params["role"] == "block") & (params["param"] == "kernel")
                  & ((params["layer"] == params["block"] + "_linear") | (params["layer"] == params["block"] + "_rnn"))]


# ----------------------------------------------------------------------------------------------- selectors


def _filter(df: pd.DataFrame, arm: ArmRecord, table: str, filters: dict[str, Any]) -> pd.DataFrame:
    """Rows matching every filter: a value, a list (any of), ``"lo:hi"`` (inclusive; either end may be
    empty) or ``"first"``/``"last"`` (the smallest/largest value in the arm's remaining rows; for ``depth``
    the stem and head, depth -1, are left out of ``first``). ``first``/``last`` are resolved last."""
    later = []
    for col, want in filters.items():
        if want is None:
            continue
        if col not in df.columns:
            raise NotMeasurable(f"{table} of arm {arm.id} has no column '{col}'")
        if want in ("first", "last"):
            later.append((col, want))
        elif isinstance(want, str) and ":" in want:
            lo, hi = (float(s) if s.strip() else None for s in want.split(":", 1))
            v = df[col].astype(float)
            df = df[(v >= lo if lo is not None else True) & (v <= hi if hi is not None else True)]
        elif isinstance(want, (list, tuple, np.ndarray)):
            df = df[df[col].isin(list(want))]
        else:
            df = df[df[col] == want]
    for col, want in later:
        values = df[col][df[col] >= 0] if col == "depth" and (df[col] >= 0).any() else df[col]
        if values.empty:
            break
        df = df[df[col] == (values.min() if want == "first" else values.max())]
    return df


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("step", "epoch", "depth", "t") if c in df.columns]
    return df.sort_values(keys, kind="stable") if keys else df


def _rows(src: RunSource, table: str, column: str, arm: Optional[str], filters: dict[str, Any]
          ) -> list[tuple[ArmRecord, pd.DataFrame]]:
    out = []
    for a in src.match(arm):
        df = src.table(a, table)
        if column not in df.columns:
            raise NotMeasurable(f"{table} of arm {a.id} has no column '{column}'")
        df = _ordered(_filter(df, a, table, filters))
        if df.empty:
            raise NotMeasurable(f"no rows of {table} in arm {a.id} match {_describe(filters)}")
        out.append((a, df))
    return out


def _describe(filters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in filters.items() if v is not None) or "(no filter)"


def _reduce(values: np.ndarray, how: str) -> float:
    v = np.asarray(values, dtype=float)
    if how == "count":
        return float(len(v))
    if not len(v):
        return math.nan
    return {"mean": np.mean, "median": np.median, "sum": np.sum, "min": np.min, "max": np.max,
            "first": lambda x: x[0], "last": lambda x: x[-1], "norm": lambda x: math.sqrt(float(np.sum(x * x))),
            "std": lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0}[how](v)


def sel_column(src: RunSource, table: str, column: str, arm: Optional[str] = None, by: Optional[str] = None,
               reduce: Optional[str] = None, **filters: Any) -> np.ndarray:
    """Values of ``table.column`` in the matched arms' rows that pass ``filters``.

    ``by=None``: every row (arms concatenated in seed order). ``by="arm"``: one ``reduce``-d value per arm.
    ``by=<column>`` (e.g. ``"step"``): one value per (arm, value of that column), e.g. the number of active
    stochastic-depth blocks per step with ``by="step", reduce="sum"``.
    """
    out: list[float] = []
    for a, df in _rows(src, table, column, arm, filters):
        if by is None:
            out.extend(df[column].astype(float))
        elif by == "arm":
            out.append(_reduce(df[column].to_numpy(), reduce or "mean"))
        else:
            if by not in df.columns:
                raise NotMeasurable(f"{table} of arm {a.id} has no column '{by}' to group by")
            out.extend(_reduce(g[column].to_numpy(), reduce or "mean") for _, g in df.groupby(by, sort=True))
    return np.asarray(out, dtype=float)


def _profile(df: pd.DataFrame, over: str, column: str) -> pd.Series:
    """Mean of ``column`` per value of ``over`` (one row per value for the block tables), sorted."""
    if over not in df.columns:
        raise NotMeasurable(f"no column '{over}' to order by")
    prof = df.groupby(over, sort=True)[column].mean()
    return prof[prof.index >= 0] if over == "depth" and (prof.index >= 0).sum() >= 2 else prof


def _pick(prof: pd.Series, which: Any) -> float:
    if which == "first":
        return float(prof.iloc[0])
    if which == "last":
        return float(prof.iloc[-1])
    if which not in prof.index:
        raise NotMeasurable(f"no value at {prof.index.name} = {which} (have {prof.index.min()}..{prof.index.max()})")
    return float(prof.loc[which])


def sel_ratio(src: RunSource, table: str, column: str, arm: Optional[str] = None, step: Any = "first",
              over: str = "depth", num: Any = "first", den: Any = "last", **filters: Any) -> np.ndarray:
    """Per arm: ``column`` at ``over = num`` divided by its value at ``over = den`` (default: first block over
    last block at the first captured step; ``over="t"`` on ``time_grads`` gives ||dL/dh_0|| / ||dL/dh_T-1||)."""
    out = []
    for _, df in _rows(src, table, column, arm, {"step": step, **filters}):
        prof = _profile(df, over, column)
        top, bottom = _pick(prof, num), _pick(prof, den)
        out.append(top / bottom if bottom != 0 else math.nan)
    return np.asarray(out, dtype=float)


def sel_slope(src: RunSource, table: str, column: str, arm: Optional[str] = None, step: Any = "first",
              over: str = "depth", log: Any = "e", lo: Optional[float] = None, hi: Optional[float] = None,
              **filters: Any) -> np.ndarray:
    """Per arm: least-squares slope of ``log(column)`` (base ``"e"``, ``10``, or ``None`` for no log)
    against ``over`` for ``lo <= over <= hi``."""
    out = []
    for a, df in _rows(src, table, column, arm, {"step": step, **filters}):
        prof = _profile(df, over, column)
        prof = prof[(prof.index >= (lo if lo is not None else -np.inf)) & (prof.index <= (hi if hi is not None else np.inf))]
        y = prof.to_numpy(dtype=float)
        if len(y) < 2:
            raise NotMeasurable(f"arm {a.id}: fewer than 2 points of {table}.{column} to fit a slope")
        if log is not None:
            if not (np.isfinite(y).all() and (y > 0).all()):
                raise NotMeasurable(f"arm {a.id}: {table}.{column} has values <= 0 or non-finite; no log slope")
            y = np.log(y) if log == "e" else np.log(y) / math.log(float(log))
        out.append(float(np.polyfit(prof.index.to_numpy(dtype=float), y, 1)[0]))
    return np.asarray(out, dtype=float)


def sel_summary(src: RunSource, key: str, arm: Optional[str] = None) -> np.ndarray:
    """Per arm: a ``summary.json`` value (dotted for nested ones, e.g. ``final.loss``); None reads as NaN."""
    out = []
    for a in src.match(arm):
        v: Any = a.summary
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out.append(math.nan if v is None else v)
    return np.asarray(out, dtype=object if any(isinstance(v, str) for v in out) else float)


def sel_config(src: RunSource, key: str, arm: Optional[str] = None) -> np.ndarray:
    """Per arm: a value of its resolved config (``arm.yaml``), e.g. ``train.optimizer.learning_rate``."""
    out = []
    for a in src.match(arm):
        if key not in a.config:
            raise NotMeasurable(f"arm {a.id} has no config key '{key}'")
        out.append(math.nan if a.config[key] is None else a.config[key])
    return np.asarray(out, dtype=object if any(isinstance(v, str) for v in out) else float)


# ----------------------------------------------------------------------------------------------- functions


def _arr(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a.reshape(-1) if a.ndim else a.reshape(1)


def _crossing(xs: Any, ys: Any, level: float = 0.0) -> float:
    """The x where the piecewise-linear curve (xs, ys) first crosses ``level`` (NaN when it does not)."""
    x, y = _arr(xs), _arr(ys) - level
    if len(x) != len(y) or len(x) < 2:
        raise ExpressionError(f"crossing needs xs and ys of the same length >= 2, got {len(x)} and {len(y)}")
    for i in range(len(x) - 1):
        if y[i] == 0:
            return float(x[i])
        if y[i] * y[i + 1] < 0:
            return float(x[i] + (x[i + 1] - x[i]) * y[i] / (y[i] - y[i + 1]))
    return float(x[-1]) if y[-1] == 0 else math.nan


def _activation(name: str, field: str) -> float:
    from ablations import theory

    if field == "value_min":  # min of phi itself on the theory grid (e.g. GELU's -0.17 at z = -0.75)
        z = np.linspace(-theory.Z_MAX, theory.Z_MAX, theory.Z_POINTS)
        return float(np.min(theory.derivative(name, z)[0]))
    return float(_theory_row(theory, name)[field])


_ROWS: dict[str, dict[str, Any]] = {}


def _theory_row(theory: Any, name: str) -> dict[str, Any]:
    if name not in _ROWS:  # autodiff over 400k points: once per activation and process
        _ROWS[name] = theory.activation_row(name)
    return _ROWS[name]


def _minmax(fn: Callable, *xs: Any) -> Any:
    if len(xs) == 1:
        a = _arr(xs[0])
        return float(fn(a)) if len(a) else math.nan
    return fn(np.stack(np.broadcast_arrays(*(_arr(x) for x in xs))), axis=0)


def _meanfield(name: str) -> Callable:
    def call(*args: Any) -> float:
        from ablations import meanfield

        return getattr(meanfield, name)(*(float(_arr(a)[0]) for a in args))

    return call


@dataclasses.dataclass(frozen=True)
class Function:
    """A whitelisted function: its positional parameters (``required`` of them needed), keywords, whether
    further keywords are column filters, which arguments must be literals, and its one-line doc."""

    fn: Callable
    params: tuple[str, ...]
    required: int
    doc: str
    keywords: tuple[str, ...] = ()
    selector: bool = False  # first argument is the RunSource
    filters: bool = False  # other keywords filter table columns
    literal: tuple[str, ...] = ()  # must be literal strings (checked against the schema when loaded)


_SEL_KW = ("arm",)
FUNCTIONS: dict[str, Function] = {
    # selectors (one value per matched arm, unless said otherwise)
    "column": Function(sel_column, ("table", "column"), 2, "values of a table column in the matched rows; "
                       "by=arm|<column> with reduce=mean|median|sum|min|max|first|last|norm|count|std",
                       _SEL_KW + ("by", "reduce"), True, True, ("table", "column", "arm", "by", "reduce")),
    "ratio": Function(sel_ratio, ("table", "column"), 2, "per arm: value at over=num / value at over=den "
                      "(default first/last block at the first step)", _SEL_KW + ("step", "over", "num", "den"),
                      True, True, ("table", "column", "arm", "over")),
    "slope": Function(sel_slope, ("table", "column"), 2, "per arm: least-squares slope of log(column) "
                      "against over (depth) for lo <= over <= hi; log=e|10|None",
                      _SEL_KW + ("step", "over", "log", "lo", "hi"), True, True, ("table", "column", "arm", "over")),
    "summary": Function(sel_summary, ("key",), 1, "per arm: a summary.json value (final.loss, ratio_init, "
                        "wall_time_s, status, ...)", _SEL_KW, True, False, ("key", "arm")),
    "config": Function(sel_config, ("key",), 1, "per arm: a resolved config value (arm.yaml dotted key)",
                       _SEL_KW, True, False, ("key", "arm")),
    # reductions over all elements
    **{n: Function(f, ("x",), 1, d) for n, f, d in [
        ("mean", lambda x: float(np.mean(_arr(x))), "mean of the elements"),
        ("median", lambda x: float(np.median(_arr(x))), "median of the elements"),
        ("std", lambda x: float(np.std(_arr(x), ddof=1)) if len(_arr(x)) > 1 else 0.0,
         "sample standard deviation (ddof 1; 0 for one element)"),
        ("sum", lambda x: float(np.sum(_arr(x))), "sum of the elements"),
        ("count", lambda x: float(len(_arr(x))), "number of elements"),
        ("first", lambda x: float(_arr(x)[0]), "first element"),
        ("last", lambda x: float(_arr(x)[-1]), "last element"),
        ("geomean", lambda x: float(np.exp(np.mean(np.log(_arr(x))))), "geometric mean"),
        ("all", lambda x: bool(np.all(np.asarray(x))), "every element true"),
        ("any", lambda x: bool(np.any(np.asarray(x))), "some element true"),
    ]},
    "min": Function(lambda *x: _minmax(np.min, *x), tuple(f"x{i}" for i in range(1, 11)), 1,
                    "min of the elements; of several arguments: element-wise"),
    "max": Function(lambda *x: _minmax(np.max, *x), tuple(f"x{i}" for i in range(1, 11)), 1,
                    "max of the elements; of several arguments: element-wise"),
    # element-wise
    **{n: Function(f, ("x",), 1, f"element-wise {n}") for n, f in [
        ("abs", lambda x: np.abs(_arr(x))), ("log", lambda x: np.log(_arr(x))),
        ("log10", lambda x: np.log10(_arr(x))), ("log2", lambda x: np.log2(_arr(x))),
        ("exp", lambda x: np.exp(_arr(x))), ("sqrt", lambda x: np.sqrt(_arr(x))),
        ("isfinite", lambda x: np.isfinite(_arr(x)))]},
    "arange": Function(lambda a, b: np.arange(float(_arr(a)[0]), float(_arr(b)[0])), ("start", "stop"), 2,
                       "start, start + 1, ..., < stop"),
    "crossing": Function(_crossing, ("xs", "ys", "level"), 2, "x where the piecewise-linear (xs, ys) first "
                         "crosses level (default 0)"),
    # theory (ablations/meanfield.py, ablations/theory.py)
    "qstar": Function(_meanfield("qstar"), ("sigma_w2", "sigma_b2"), 2,
                      "mean-field fixed point q* of a tanh net (Schoenholz et al. 2017)"),
    "chi1": Function(_meanfield("chi1"), ("sigma_w2", "sigma_b2"), 2,
                     "chi_1 = sigma_w^2 E[tanh'(sqrt(q*) z)^2] (Schoenholz et al. 2017)"),
    "critical_sigma_w2": Function(_meanfield("critical_sigma_w2"), ("sigma_b2",), 1,
                                  "sigma_w^2 where chi_1 = 1 for a tanh net"),
    **{n: Function(lambda name, f=f: _activation(name, f), ("activation",), 1, d, literal=("activation",))
       for n, f, d in [("max_derivative", "max_derivative", "max |phi'| of a registered activation (autodiff)"),
                       ("derivative_min", "derivative_min", "min of phi' over z in [-20, 20]"),
                       ("derivative_max", "derivative_max", "max of phi' over z in [-20, 20]"),
                       ("value_min", "value_min", "min of phi itself over z in [-20, 20]")]},
}


# ----------------------------------------------------------------------------------------------- parsing

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FORBIDDEN = {ast.Attribute: "attribute access (a.b)", ast.Subscript: "subscripts (a[i])",
              ast.Lambda: "lambda", ast.ListComp: "comprehensions", ast.GeneratorExp: "comprehensions",
              ast.DictComp: "comprehensions", ast.SetComp: "comprehensions", ast.Dict: "dict literals",
              ast.Set: "set literals", ast.IfExp: "conditional expressions", ast.NamedExpr: "assignment (:=)",
              ast.Starred: "*-unpacking", ast.JoinedStr: "f-strings", ast.Await: "await", ast.Yield: "yield"}


@dataclasses.dataclass
class Expression:
    """A parsed, checked expression: its text, syntax tree, the measure names and the arm selectors it uses."""

    text: str
    tree: ast.Expression
    names: set[str]
    selectors: list[str]  # arm selector strings, checked against the experiment's arms when loaded
    tables: set[str]


def parse(text: str, names: Iterable[str] = (), extra_tables: Iterable[str] = ()) -> Expression:
    """Parses and checks an expression.

    Args:
        text: the expression.
        names: the names it may use (earlier measures).
        extra_tables: tables of required instruments (their columns are not checked).

    Raises:
        ExpressionError: syntax error, a construct outside the language, an unknown name, function,
            keyword, table, column or summary key (the message gives the column in ``text``).
    """
    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"syntax error at column {err.offset or 0}: {err.msg}") from None
    out = Expression(str(text).strip(), tree, set(), [], set())
    known, extra = set(names), set(extra_tables)
    callees = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if id(node) not in callees:  # a called name is checked as a function by its Call
            _check_node(node, out, known, extra)
    return out


def _at(node: ast.AST) -> str:
    return f" at column {getattr(node, 'col_offset', 0) + 1}"


def _check_node(node: ast.AST, out: Expression, known: set[str], extra: set[str]) -> None:
    kind = type(node)
    if kind in _FORBIDDEN:
        raise ExpressionError(f"not allowed in a claim expression: {_FORBIDDEN[kind]}{_at(node)}")
    if kind is ast.Name:
        if node.id in FUNCTIONS:
            raise ExpressionError(f"'{node.id}' is a function: call it{_at(node)}")
        if node.id not in known and node.id not in CONSTANTS:
            allowed = sorted(known) + list(CONSTANTS)
            raise ExpressionError(f"unknown name '{node.id}'{_at(node)}.{suggest(node.id, allowed)} Names here: "
                                  f"{', '.join(allowed)} (a measure can use only those defined before it)")
        out.names.add(node.id)
    elif kind is ast.Call:
        _check_call(node, out, extra)
    elif kind is ast.Constant and not isinstance(node.value, (int, float, str, bool, type(None))):
        raise ExpressionError(f"constant {node.value!r} is not allowed{_at(node)}")
    elif kind is ast.BinOp and type(node.op) not in _BINOPS:
        raise ExpressionError(f"operator {type(node.op).__name__} is not allowed{_at(node)} (allowed: + - * / ** %)")
    elif kind is ast.UnaryOp and not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        raise ExpressionError(f"operator {type(node.op).__name__} is not allowed{_at(node)}")
    elif kind is ast.Compare and any(type(op) not in _CMPOPS for op in node.ops):
        raise ExpressionError(f"only < <= > >= == != comparisons are allowed{_at(node)}")
    elif kind not in (ast.Expression, ast.Name, ast.Call, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare,
                      ast.BoolOp, ast.List, ast.Tuple, ast.Load, ast.keyword, ast.And, ast.Or,
                      *_BINOPS, *_CMPOPS, ast.USub, ast.UAdd, ast.Not):
        raise ExpressionError(f"{kind.__name__} is not allowed{_at(node)}")


def _check_call(node: ast.Call, out: Expression, extra: set[str]) -> None:
    if isinstance(node.func, ast.Attribute):
        raise ExpressionError(f"not allowed in a claim expression: attribute access (a.b), methods too{_at(node)}")
    if not isinstance(node.func, ast.Name):
        raise ExpressionError(f"only the listed functions can be called, by name{_at(node)}")
    name = node.func.id
    if name not in FUNCTIONS:
        raise ExpressionError(f"function '{name}' is not allowed{_at(node)}.{suggest(name, list(FUNCTIONS))} "
                              f"Functions: {', '.join(FUNCTIONS)}")
    spec = FUNCTIONS[name]
    if any(k.arg is None for k in node.keywords):
        raise ExpressionError(f"**-unpacking is not allowed{_at(node)}")
    if len(node.args) > len(spec.params):
        raise ExpressionError(f"{name}() takes at most {len(spec.params)} positional arguments "
                              f"({', '.join(spec.params)}){_at(node)}")
    args = dict(zip(spec.params, node.args))
    for k in node.keywords:
        if k.arg in args:
            raise ExpressionError(f"{name}() got '{k.arg}' twice{_at(node)}")
        args[k.arg] = k.value
    missing = [p for p in spec.params[: spec.required] if p not in args]
    if missing:
        raise ExpressionError(f"{name}() needs {', '.join(missing)}{_at(node)}")
    for p in spec.literal:
        if p in args and not (isinstance(args[p], ast.Constant) and isinstance(args[p].value, (str, type(None)))):
            raise ExpressionError(f"{name}(): '{p}' must be a literal string{_at(args[p])}")
    lit = {p: args[p].value for p in spec.literal if p in args}
    table = lit.get("table")
    if table is not None:
        _check_table(name, table, lit, args, spec, node, extra)
        out.tables.add(table)
    else:
        bad = [k for k in args if k not in spec.params and k not in spec.keywords]
        if bad:
            raise ExpressionError(f"{name}() has no keyword '{bad[0]}'{_at(node)}.{suggest(bad[0], list(spec.keywords))} "
                                  f"Keywords: {', '.join(spec.params + spec.keywords) or 'none'}")
    if name == "summary" and not (lit["key"] in SUMMARY_KEYS or lit["key"].startswith("final.")):
        raise ExpressionError(f"summary key '{lit['key']}' is not stored{_at(node)}.{suggest(lit['key'], list(SUMMARY_KEYS))} "
                              f"Keys: {', '.join(SUMMARY_KEYS)}, final.<metric>")
    if lit.get("arm"):
        parse_selector(lit["arm"])
        out.selectors.append(lit["arm"])


def _check_table(name: str, table: str, lit: dict[str, Any], args: dict[str, ast.AST], spec: Function,
                 node: ast.AST, extra: set[str]) -> None:
    if table in extra:
        return  # a required instrument's table: its columns are known once the instrument lands
    if table not in TABLES:
        raise ExpressionError(f"unknown table '{table}'{_at(node)}.{suggest(table, list(TABLES))} "
                              f"Tables: {', '.join(TABLES)}")
    cols = TABLES[table]
    for key in ["column", "over"] + [k for k in args if k not in spec.params and k not in spec.keywords]:
        col = lit.get(key, key if key not in ("column", "over") else None)
        if col is not None and col not in cols:
            what = "column" if key in ("column", "over") else "filter"
            raise ExpressionError(f"{name}(): table {table} has no {what} '{col}'{_at(node)}."
                                  f"{suggest(col, list(cols))} Columns: {', '.join(cols)}")
    if lit.get("by") not in (None, "arm") and lit["by"] not in cols:
        raise ExpressionError(f"{name}(): by='{lit['by']}' is neither 'arm' nor a column of {table}{_at(node)}")
    if lit.get("reduce") is not None and lit["reduce"] not in REDUCERS:
        raise ExpressionError(f"{name}(): reduce='{lit['reduce']}' is not one of {', '.join(REDUCERS)}{_at(node)}")


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(expr: Expression, src: Optional[RunSource], env: dict[str, Any]) -> Any:
    """The value of a parsed expression on a run folder (``src``; None for pure theory) and earlier measures.

    Raises:
        NotMeasurable: the tables cannot give a value (missing arm/table/rows, NaN in a comparison).
        ExpressionError: the values do not fit together (e.g. arrays of different lengths).
    """
    return _Eval(expr.text, src, env).run(expr.tree.body)


def truth(value: Any) -> bool:
    """A condition's verdict: a bool, or an array that is non-empty and true everywhere."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    a = np.asarray(value)
    if a.dtype != bool:
        raise ExpressionError(f"a condition must be a comparison (true/false), got the value {format_value(value)}")
    return bool(a.size) and bool(a.all())


def has_nan(value: Any) -> bool:
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return False
    return bool(np.isnan(a).any())


class _Eval:
    def __init__(self, text: str, src: Optional[RunSource], env: dict[str, Any]):
        self.text, self.src, self.env = text, src, env

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or type(node).__name__

    def run(self, node: ast.AST) -> Any:
        kind = type(node)
        if kind is ast.Constant:
            return node.value
        if kind is ast.Name:
            return self.env[node.id] if node.id in self.env else CONSTANTS[node.id]
        if kind in (ast.List, ast.Tuple):
            items = [self.run(e) for e in node.elts]
            if any(np.size(i) != 1 for i in items):  # a list is one value per element, never flattened
                raise ExpressionError(f"`{self.segment(node)}`: list elements must be single values (reduce "
                                      f"per-arm values with mean(...) first)")
            items = [np.asarray(i).reshape(-1)[0] if isinstance(i, np.ndarray) else i for i in items]
            return np.asarray(items, dtype=object if any(isinstance(i, str) for i in items) else float).reshape(-1)
        if kind is ast.BinOp:
            return self.arith(node, _BINOPS[type(node.op)], self.run(node.left), self.run(node.right))
        if kind is ast.UnaryOp:
            v = self.run(node.operand)
            if isinstance(node.op, ast.Not):
                return not truth(v)
            return -_num(v) if isinstance(node.op, ast.USub) else _num(v)
        if kind is ast.BoolOp:
            want = isinstance(node.op, ast.And)
            for e in node.values:  # short-circuit, like Python
                if truth(self.run(e)) != want:
                    return not want
            return want
        if kind is ast.Compare:
            return self.compare(node)
        if kind is ast.Call:
            return self.call(node)
        raise ExpressionError(f"{kind.__name__} is not allowed")  # parse() already refused it

    def arith(self, node: ast.AST, op: Callable, a: Any, b: Any) -> Any:
        try:
            with np.errstate(all="ignore"):  # log(0) = -inf and x / 0 = inf are values, not errors
                return op(_num(a), _num(b))
        except ValueError as err:
            raise ExpressionError(f"`{self.segment(node)}`: {err}") from None
        except ZeroDivisionError:
            return math.nan

    def compare(self, node: ast.Compare) -> Any:
        left, left_node = self.run(node.left), node.left
        result: Any = True
        for op, right_node in zip(node.ops, node.comparators):
            right = self.run(right_node)
            for side, n in ((left, left_node), (right, right_node)):
                if has_nan(side):
                    raise NotMeasurable(f"`{self.segment(n)}` is NaN ({format_value(side)})")
            try:
                r = _CMPOPS[type(op)](_num(left), _num(right))
            except ValueError as err:
                raise ExpressionError(f"`{self.segment(node)}`: {err}") from None
            result = np.logical_and(result, r)
            left, left_node = right, right_node
        return bool(result) if np.ndim(result) == 0 else np.asarray(result)

    def call(self, node: ast.Call) -> Any:
        spec = FUNCTIONS[node.func.id]
        args = [self.run(a) for a in node.args]
        kwargs = {k.arg: self.run(k.value) for k in node.keywords}
        if spec.selector:
            if self.src is None:
                raise NotMeasurable(f"`{self.segment(node)}` needs a run folder")
            kwargs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
            return spec.fn(self.src, *args, **kwargs)
        try:
            with np.errstate(all="ignore"):
                return spec.fn(*args, **kwargs)
        except (TypeError, ValueError, IndexError) as err:
            raise ExpressionError(f"`{self.segment(node)}`: {err}") from None


def _num(v: Any) -> Any:
    """Numbers stay numbers; lists/arrays become float arrays (object arrays of strings stay as they are)."""
    if isinstance(v, np.ndarray):
        if v.dtype == object and not any(isinstance(x, str) for x in v):
            return v.astype(float)
        return v
    return v


def format_value(v: Any, spec: str = ".3g") -> str:
    """A value for tables: a number, ``a, b`` for up to 3 elements, ``mean [min, max] (n)`` beyond."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    a = np.asarray(v)
    if a.dtype == object:
        return ", ".join(str(x) for x in a.reshape(-1))
    a = a.astype(float).reshape(-1)
    if a.dtype == bool or not a.size:
        return "[]" if not a.size else ", ".join("true" if x else "false" for x in a)
    if a.size <= 3:
        return ", ".join(format(float(x), spec) for x in a)
    return f"{np.mean(a):{spec}} [{np.min(a):{spec}}, {np.max(a):{spec}}] ({a.size})"
