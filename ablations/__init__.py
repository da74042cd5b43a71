"""gradzoo's ablation tool: config, data, probe, runner, store, report and CLI.

Public entry points: :class:`Probe` (your model under the probe in your own ``compile``/``fit``, writing a
run folder ``ablate report`` reads), :func:`measure` (statistics of one batch, for notebooks and tests) and
the ``ablate`` command line. Heavy modules (TensorFlow) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from ablations.quiet import quiet_environment

quiet_environment()  # before anything imports TensorFlow: keep its C++ start-up chatter off the terminal

__version__ = "0.1.0"


def measure(model: Any, batch: Any, loss: Any, **kwargs: Any) -> Any:
    """Statistics of one batch without training; see :func:`ablations.probe.measure`."""
    from ablations.probe import measure as _measure

    return _measure(model, batch, loss, **kwargs)


def __getattr__(name: str) -> Any:
    """``ablations.Probe`` imports TensorFlow only when it is first used."""
    if name == "Probe":
        from ablations.probe.api import Probe

        return Probe
    raise AttributeError(f"module 'ablations' has no attribute {name!r}")


__all__ = ["Probe", "measure", "__version__"]
