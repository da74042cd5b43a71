"""Models from outside the zoo, by name in ``model.arch`` (or ``model.file``): an importable builder, a Keras
application, a saved ``.keras`` file.

* ``model.arch: package.module:function`` — ``function(**options)`` returns a ``keras.Model``; it also gets
  ``input_shape`` / ``num_outputs`` from the dataset when its signature takes them. Its keyword options are
  read from the module's source with :mod:`ast` (nothing is imported to validate a config) and checked like
  zoo options: unknown names with a close match, literal defaults' types. Modules are imported from the
  current directory or ``$PYTHONPATH`` (worker processes start in the same directory).
* ``model.arch: keras_applications/<Name>`` (e.g. ``keras_applications/ResNet50``) — ``keras.applications.
  <Name>(weights=None, include_top=False, pooling="avg")`` on the dataset's images, resized to
  ``input_size`` (default 32: the applications' minimum) and repeated to 3 channels where needed, under a
  linear head ``head_linear``; options: ``input_size``, and the application's own (``alpha`` for MobileNets,
  ...), checked against its signature when the model is built. Weights are never downloaded.
* ``model.file: path.keras`` — ``keras.saving.load_model(path, safe_mode=True)``; custom objects come from
  the modules named in ``model.imports`` (imported first). Its input must match the dataset's.

Blocks of all of them are found by :mod:`ablations.probe.discovery` (names and graph rules).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from zoo.registry import UnknownNameError, suggest
from zoo.rules import BadOptionError
from zoo.signatures import DATA_ARGS, Param

APPLICATIONS_PREFIX = "keras_applications/"
APP_OPTIONS = {"input_size": Param("input_size", "int", 32)}


def kind(arch: str) -> str:
    """``callable`` (``module:function``), ``application`` (``keras_applications/<Name>``) or ``zoo``."""
    if arch.startswith(APPLICATIONS_PREFIX):
        return "application"
    return "callable" if ":" in arch else "zoo"


def _importable() -> None:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `ablate` (a console script) does not put the working directory there


def callable_params(arch: str) -> tuple[dict[str, Param], bool]:
    """``({option: Param}, takes **kwargs)`` of a ``module:function`` builder, read from its source.

    Raises:
        UnknownNameError: no such module or function (with the module's functions as the known names).
    """
    module, _, name = arch.partition(":")
    _importable()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise UnknownNameError("model module", module, [])
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if name not in funcs:
        raise UnknownNameError(f"function in {module}", name, list(funcs))
    node = funcs[name]
    args = node.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = {}
    for arg, default in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
        if arg.arg in DATA_ARGS or arg.arg == "self":
            continue
        try:
            value = ast.literal_eval(default) if default is not None else None
        except ValueError:
            value = None
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else "Any"
        params[arg.arg] = Param(arg.arg, annotation, value)
    return params, args.kwarg is not None


def check(arch: str, opts: dict[str, Any]) -> None:
    """Options of an outside builder: known names (from its signature), and for applications ours."""
    if kind(arch) == "application":
        if not arch[len(APPLICATIONS_PREFIX):]:
            raise UnknownNameError("Keras application", "", [])
        size = opts.get("input_size", 32)
        if not isinstance(size, int) or isinstance(size, bool) or size < 32:
            raise BadOptionError(f"input_size must be an integer >= 32 (the applications' minimum), got {size!r}",
                                 option="input_size")
        if opts.get("weights") not in (None,):
            raise BadOptionError("weights must be null: gradzoo studies gradients from an initialisation and "
                                 "never downloads weights", option="weights")
        return  # the application's own options are checked against its signature when it is built
    params, extra = callable_params(arch)
    for key in opts:
        if key not in params and not extra:
            raise BadOptionError(f"builder '{arch}' has no option '{key}'.{suggest(key, list(params))} "
                                 f"Options of {arch}: {', '.join(sorted(params)) or 'none'}", option=key)


def build_callable(arch: str, input_shape: tuple[int, ...], num_outputs: int, **opts: Any) -> Any:
    """Imports ``module`` and calls ``function`` (data arguments passed when it takes them)."""
    module, _, name = arch.partition(":")
    _importable()
    fn = getattr(importlib.import_module(module), name)
    sig = inspect.signature(fn).parameters
    data = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_outputs", num_outputs)) if k in sig}
    model = fn(**data, **opts)
    _check_model(model, arch)
    return model


def build_application(arch: str, input_shape: tuple[int, ...], num_outputs: int, input_size: int = 32,
                      **opts: Any) -> Any:
    """A Keras application (no weights) on the dataset's images, under a linear head."""
    import keras

    name = arch[len(APPLICATIONS_PREFIX):]
    app_fn = getattr(keras.applications, name, None)
    if app_fn is None:
        known = [n for n in dir(keras.applications) if n[:1].isupper()]
        raise UnknownNameError("Keras application", name, known)
    allowed = set(inspect.signature(app_fn).parameters) - {"weights", "input_shape", "include_top", "pooling",
                                                             "classes", "input_tensor"}
    for key in opts:
        if key not in allowed:
            raise BadOptionError(f"keras.applications.{name} has no option '{key}'.{suggest(key, sorted(allowed))} "
                                 f"Options: input_size, {', '.join(sorted(allowed))}", option=key)
    if len(input_shape) != 3:
        raise ValueError(f"{arch} needs image inputs (height, width, channels), got {tuple(input_shape)}")
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = inputs
    if tuple(input_shape[:2]) != (input_size, input_size):
        x = keras.layers.Resizing(input_size, input_size, name="stem_resize")(x)
    if input_shape[2] != 3:
        x = keras.layers.Concatenate(name="stem_channels")([x] * 3) if input_shape[2] == 1 else \
            keras.layers.Conv2D(3, 1, name="stem_channels")(x)
    base = app_fn(weights=None, include_top=False, pooling="avg", input_shape=(input_size, input_size, 3), **opts)
    out = keras.layers.Dense(num_outputs, name="head_linear")(base(x))
    return keras.Model(inputs, out, name=name.lower())


def load_file(path: str, imports: list[str] | None = None) -> Any:
    """A saved model (``safe_mode=True``), after importing the modules that register its custom objects."""
    import keras

    _importable()
    for module in imports or []:
        importlib.import_module(module)
    import zoo.layers  # noqa: F401 - gradzoo's own layers are registered serializable

    model = keras.saving.load_model(path, safe_mode=True)
    _check_model(model, path)
    return model


def _check_model(model: Any, where: str) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"{where} did not give a keras.Model (got {type(model).__name__})")
