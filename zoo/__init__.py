"""gradzoo's model zoo: ``register``, ``build``, ``names``, ``blocks``.

Every builder is a function with keyword-only typed arguments returning a functional ``keras.Model`` whose
repeated blocks are tagged (see :mod:`zoo.blocks`). ``depth`` counts the repeated blocks; ``input_shape``
and ``num_outputs`` come from the dataset.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the terminal

from zoo.blocks import Block, blocks, block_name, layer_role, parse_layer_name
from zoo.registry import Registry, UnknownNameError, suggest

if TYPE_CHECKING:
    import keras

MODELS: Registry[Callable[..., "keras.Model"]] = Registry("model")

# Builder modules, imported on first use so that `import zoo` (and the config layer) stays free of TensorFlow.
_BUILDER_MODULES = ("zoo.mlp", "zoo.cnn", "zoo.highway", "zoo.densenet", "zoo.stochastic_depth", "zoo.rezero",
                    "zoo.rnn", "zoo.transformer")
_loaded = False


def _load() -> Registry:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILDER_MODULES:
            importlib.import_module(mod)
    return MODELS

# Arguments the runner supplies from the dataset; users do not set them in YAML.
DATA_ARGS = ("input_shape", "num_outputs")


class BadOptionError(ValueError):
    """A model option that the builder does not accept."""


def register(name: str, *, family: str, paper: str) -> Callable[[Callable[..., keras.Model]], Callable[..., keras.Model]]:
    """Registers a model builder under ``name`` (decorator).

    Args:
        name: the name used in YAML (``model.arch``).
        family: ``mlp``, ``cnn``, ``rnn`` or ``transformer``.
        paper: one-line reference shown by ``ablate zoo``.
    """
    return MODELS.register(name, family=family, paper=paper)


def names() -> list[str]:
    """Returns the registered model names."""
    return _load().names()


def options(name: str) -> dict[str, tuple[Any, str]]:
    """Returns ``{option: (default, annotation)}`` for the builder ``name`` (data arguments excluded)."""
    sig = inspect.signature(_load().get(name))
    return {
        p.name: (p.default, str(p.annotation))
        for p in sig.parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in DATA_ARGS
    }


def check_options(name: str, opts: dict[str, Any]) -> None:
    """Raises :class:`BadOptionError` naming the first option ``name``'s builder does not take."""
    allowed = options(name)
    for key in opts:
        if key not in allowed:
            raise BadOptionError(
                f"model '{name}' has no option '{key}'.{suggest(key, list(allowed))} "
                f"Options of {name}: {', '.join(sorted(allowed))}"
            )


def build(name: str, **kwargs: Any) -> keras.Model:
    """Builds the registered model ``name``; unknown names or options fail with the known ones listed."""
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
    return _load().meta(name).get("paper", "")


def family(name: str) -> str:
    """Returns the family (mlp, cnn, rnn, transformer) of model ``name``."""
    return _load().meta(name).get("family", "")

__all__ = [
    "Block", "BadOptionError", "MODELS", "UnknownNameError", "block_name", "blocks", "build",
    "check_options", "family", "layer_role", "names", "options", "paper", "parse_layer_name", "register",
]
