"""gradzoo's model zoo: ``register``, ``build``, ``names``, ``options``, ``check_options``, ``blocks``.

Every builder is a function with keyword-only typed arguments returning a functional ``keras.Model`` whose
repeated blocks are tagged (see :mod:`zoo.blocks`). ``depth`` counts the repeated blocks; ``input_shape``
and ``num_outputs`` come from the dataset.

Everything but :func:`build` works without TensorFlow: names, families, papers and options are read from
the builders' source (:mod:`zoo.signatures`) and checked against :mod:`zoo.schema`, so ``ablate validate``
and ``ablate zoo`` never import Keras. To add a model, write ``zoo/<arch>.py`` with a ``@register`` builder
and add the module to :data:`zoo.signatures.BUILDER_MODULES`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's C++ start-up chatter off the terminal

from zoo.blocks import Block, blocks, block_name, layer_role, parse_layer_name
from zoo.options import check_model, spec
from zoo.registry import Registry, UnknownNameError, suggest
from zoo.rules import BadOptionError
from zoo.signatures import BUILDER_MODULES, DATA_ARGS, builders

if TYPE_CHECKING:
    import keras

MODELS: Registry[Callable[..., "keras.Model"]] = Registry("model")
_loaded = False


def _load() -> Registry:
    """Imports the builder modules (Keras) so that :data:`MODELS` holds the builders themselves."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILDER_MODULES:
            importlib.import_module(mod)
    return MODELS


def register(name: str, *, family: str, paper: str) -> Callable[[Callable[..., keras.Model]], Callable[..., keras.Model]]:
    """Registers a model builder under ``name`` (decorator).

    Args:
        name: the name used in YAML (``model.arch``).
        family: ``mlp``, ``cnn``, ``rnn`` or ``transformer``.
        paper: one-line reference shown by ``ablate zoo``.
    """
    return MODELS.register(name, family=family, paper=paper)


def names() -> list[str]:
    """Returns the registered model names (sorted; without importing the builders)."""
    return sorted(builders())


def options(name: str) -> dict[str, tuple[Any, str]]:
    """Returns ``{option: (default, annotation)}`` for the builder ``name`` (data arguments excluded)."""
    return {p.name: (p.default, p.annotation) for p in spec(name).params.values()}


def check_options(name: str, opts: dict[str, Any]) -> None:
    """Checks every option of model ``name``: its name, type and range, the options of the chosen activation
    and initializer, and whether the chosen functions use them (:mod:`zoo.options`).

    Raises:
        BadOptionError: an option the builder does not take or a value it does not accept (``.option`` names it).
        UnknownNameError: an unknown model, activation, initializer or norm name.
    """
    from zoo import sources

    if sources.kind(name) == "zoo":
        check_model(name, opts)
    else:
        sources.check(name, opts)


def build(name: str, **kwargs: Any) -> keras.Model:
    """Builds the registered model ``name`` (or an outside one: ``module:function``,
    ``keras_applications/<Name>``, see :mod:`zoo.sources`); unknown names or options fail with the known
    ones listed."""
    from zoo import sources

    if sources.kind(name) == "callable":
        check_options(name, {k: v for k, v in kwargs.items() if k not in DATA_ARGS})
        return sources.build_callable(name, **kwargs)
    if sources.kind(name) == "application":
        check_options(name, {k: v for k, v in kwargs.items() if k not in DATA_ARGS})
        return sources.build_application(name, **kwargs)
    builder = _load().get(name)
    check_options(name, {k: v for k, v in kwargs.items() if k not in DATA_ARGS})
    depth = kwargs.get("depth")
    if isinstance(depth, int) and depth > 0:
        # Keras walks a functional graph recursively, one Python frame per layer on the longest path, so a
        # 1000-block net (4-5 layers a block) exceeds the default limit of 1000. Python >= 3.11 keeps
        # Python-to-Python calls off the C stack, so a higher limit is safe there (3.10 may need a larger
        # thread stack for depths in the thousands).
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 16 * depth + 2000))
    return builder(**kwargs)


def paper(name: str) -> str:
    """Returns the one-line paper reference of model ``name``."""
    return spec(name).paper


def family(name: str) -> str:
    """Returns the family (mlp, cnn, rnn, transformer) of model ``name``."""
    return spec(name).family


__all__ = [
    "Block", "BadOptionError", "MODELS", "UnknownNameError", "block_name", "blocks", "build",
    "check_options", "family", "layer_role", "names", "options", "paper", "parse_layer_name", "register",
]
