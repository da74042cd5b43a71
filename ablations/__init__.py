"""gradzoo's ablation tool: config, data, probe, runner, store, report and CLI.

Public entry points: :func:`measure` (statistics of one batch, for notebooks and tests) and the ``ablate``
command line. Heavy modules (TensorFlow) are imported on first use.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the terminal

__version__ = "0.1.0"


def measure(model: Any, batch: Any, loss: Any, **kwargs: Any) -> Any:
    """Statistics of one batch without training; see :func:`ablations.probe.measure`."""
    from ablations.probe import measure as _measure

    return _measure(model, batch, loss, **kwargs)


__all__ = ["measure", "__version__"]
