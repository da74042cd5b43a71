"""The run folder (ARCHITECTURE.md section 3): atomic writes, summaries written last, a sweep lock.

::

    runs/<experiment>/experiment.yaml
    runs/<experiment>/arms/<arm_id>/{arm.yaml, history.parquet, epochs.parquet, params.parquet,
                                      blocks.parquet, final.keras, summary.json}

An arm folder without a readable ``summary.json`` is not complete and is re-run on resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

DONE_STATUSES = ("completed", "diverged", "pruned")  # results; "failed" arms are retried on resume


class StoreError(RuntimeError):
    """The run folder cannot be used (not writable, locked by another sweep)."""


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (temp file + rename)."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), w)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    _atomic(Path(path), lambda tmp: df.to_parquet(tmp, index=False))


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """NumPy arrays by name, atomically (the temp file keeps the ``.npz`` suffix NumPy expects)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model(path: Path, model: Any) -> None:
    # Keras checks the extension, so the temp file must end with .keras too.
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def read_summary(arm_dir: Path) -> dict[str, Any] | None:
    """Returns the arm's summary, or ``None`` when it is missing or unreadable (arm not complete)."""
    try:
        return json.loads((Path(arm_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def is_done(arm_dir: Path) -> bool:
    s = read_summary(arm_dir)
    return bool(s) and s.get("status") in DONE_STATUSES


class RunLock:
    """An exclusive lock on a run folder (``.lock``), released by the kernel if the process dies.

    Raises:
        StoreError: the folder cannot be created or written, or another sweep holds the lock.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"cannot write the run folder {self.root}: {err.strerror}. Choose another --out "
                             f"or fix its permissions.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"{self.root} is in use by another `ablate run` (pid {holder}); wait for it to "
                                 f"finish or use another --out. Nothing was changed.") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_writable(root: Path) -> None:
    """Raises :class:`StoreError` if ``root`` (or its nearest existing parent) is not writable."""
    p = Path(root).resolve()
    while not p.exists():
        p = p.parent
    if not os.access(p, os.W_OK | os.X_OK):
        raise StoreError(f"the output folder {root} is not writable ({p} is read-only for this user)")


def load_table(run_dir: Path, table: str) -> pd.DataFrame:
    """Concatenates ``<table>.parquet`` of every arm that has a summary, with ``arm_id`` and grid values."""
    frames = []
    for arm_dir in sorted((Path(run_dir) / "arms").glob("*")):
        summary = read_summary(arm_dir)
        f = arm_dir / f"{table}.parquet"
        if summary is None or not f.exists():
            continue
        df = pd.read_parquet(f)
        df.insert(0, "arm_id", summary["arm_id"])
        df.insert(1, "seed", summary["seed"])
        for k, v in summary.get("values", {}).items():
            df[k] = v if not isinstance(v, (list, dict)) else json.dumps(v)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_summaries(run_dir: Path) -> list[dict[str, Any]]:
    """Summaries of all arms that have one, in arm-folder order."""
    out = []
    for arm_dir in sorted((Path(run_dir) / "arms").glob("*")):
        s = read_summary(arm_dir)
        if s is not None:
            out.append(s)
    return out
