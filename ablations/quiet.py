"""Keeps TensorFlow's start-up noise out of the terminal unless ``--verbose``.

TensorFlow's C++ side logs through absl before its own log level applies: importing it prints "All log
messages before absl::InitializeLog() is called are written to STDERR" and a cudart line on machines
without CUDA, whatever ``TF_CPP_MIN_LOG_LEVEL`` says; later, device start-up logs cuInit and oneDNN lines
that ``TF_CPP_MIN_LOG_LEVEL=3`` does silence. So the environment is set before TensorFlow is imported
(:data:`QUIET_ENV`, by ``import ablations``) and the import itself runs with the process's stderr pointed
at /dev/null (:func:`import_tensorflow`); Python exceptions still surface.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Set by `import ablations` unless the user set them: 3 hides TF's C++ INFO, WARNING and ERROR lines (the
# errors that matter reach Python as exceptions); gRPC (keras-tuner's chief/worker) logs errors only.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
_set_by_us: dict[str, str] = {}


def quiet_environment() -> None:
    """Sets :data:`QUIET_ENV` where the user has not (call before TensorFlow is imported)."""
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _set_by_us[key] = value


def verbose_environment() -> None:
    """Undoes :func:`quiet_environment` (``--verbose``): TensorFlow logs at its own defaults."""
    for key in list(_set_by_us):
        os.environ[key] = "0" if key == "TF_CPP_MIN_LOG_LEVEL" else "INFO"
        del _set_by_us[key]


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null (C++ libraries write there directly, not via sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def is_quiet() -> bool:
    """True unless ``--verbose`` (or the user set TensorFlow's log level themselves)."""
    return "TF_CPP_MIN_LOG_LEVEL" in _set_by_us


def native_logs_silenced() -> contextlib.AbstractContextManager[None]:
    """:func:`stderr_silenced` while quiet (not ``--verbose``), for calls whose failures TensorFlow's C++ side
    also logs through absl, which ``TF_CPP_MIN_LOG_LEVEL`` does not cover (e.g. a failed TPU connection)."""
    return stderr_silenced() if is_quiet() else contextlib.nullcontext()


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow and Keras now, silently unless ``verbose`` (a no-op once they are imported)."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    with contextlib.nullcontext() if verbose else stderr_silenced():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
