"""The options of every model builder and of every TF-free factory, read from their signatures.

Builder modules import Keras at the top, so their signatures are read from the source with :mod:`ast`
(exact and never stale: the same text Python compiles; a test checks it against ``inspect.signature`` of the
imported builders). A builder is a module-level function decorated with ``@register("name", family=...,
paper=...)`` in one of :data:`BUILDER_MODULES`; its keyword-only arguments, minus the data arguments, are its
options. Activation and initializer factories live in TF-free modules and are read with :mod:`inspect`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

# Builder modules, imported only by zoo.build (so `import zoo` and the config layer stay free of TensorFlow).
BUILDER_MODULES = ("zoo.mlp", "zoo.cnn", "zoo.highway", "zoo.densenet", "zoo.stochastic_depth", "zoo.rezero",
                   "zoo.rnn", "zoo.transformer")
# Arguments the runner supplies from the dataset; users do not set them in YAML.
DATA_ARGS = ("input_shape", "num_outputs")


@dataclasses.dataclass(frozen=True)
class Param:
    """One keyword option: its name, annotation text (e.g. ``"float | str"``) and default."""

    name: str
    annotation: str
    default: Any


@dataclasses.dataclass(frozen=True)
class BuilderSpec:
    """A registered builder as its source declares it."""

    name: str
    family: str
    paper: str
    module: str
    params: dict[str, Param]


@functools.lru_cache(maxsize=None)
def builders() -> dict[str, BuilderSpec]:
    """Every registered builder by name, read from :data:`BUILDER_MODULES` without importing them."""
    out: dict[str, BuilderSpec] = {}
    for module in BUILDER_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ImportError(f"zoo builder module {module} not found")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                found = _registration(node)
                if found:
                    name, meta = found
                    if name in out:
                        raise ValueError(f"model '{name}' is registered twice ({out[name].module}, {module})")
                    out[name] = BuilderSpec(name, meta.get("family", ""), meta.get("paper", ""), module,
                                            _keyword_params(node))
    return out


def _registration(node: ast.FunctionDef) -> tuple[str, dict[str, Any]] | None:
    """``(name, {family, paper})`` of a function decorated with ``register("name", family=..., paper=...)``."""
    for dec in node.decorator_list:
        if not isinstance(dec, ast.Call):
            continue
        func = dec.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if called == "register" and dec.args:
            meta = {k.arg: ast.literal_eval(k.value) for k in dec.keywords if k.arg}
            return ast.literal_eval(dec.args[0]), meta
    return None


def _keyword_params(node: ast.FunctionDef) -> dict[str, Param]:
    params = {}
    for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
        if arg.arg in DATA_ARGS:
            continue
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else "Any"
        params[arg.arg] = Param(arg.arg, annotation, ast.literal_eval(default) if default is not None else None)
    return params


def factory_params(fn: Callable[..., Any]) -> dict[str, Param]:
    """The keyword-only options of a TF-free factory (an activation's or an initializer's)."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY:
            annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "Any")
            out[p.name] = Param(p.name, annotation, p.default)
    return out
