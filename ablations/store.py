"""The run folder (ARCHITECTURE.md section 3): atomic writes, summaries written last, a sweep lock.

::

    runs/<experiment>/experiment.yaml
    runs/<experiment>/arms/<arm_id>/{arm.yaml, history.parquet, epochs.parquet, params.parquet,
                                      blocks.parquet, final.keras, summary.json}
    runs/<experiment>/search[/<point>]/trials/<trial>.json     (``ablate tune``: one record per trial)

An arm folder is a result only when :func:`check_arm` finds nothing wrong with it: a ``summary.json`` that is
an arm summary, every table a result must have (:data:`REQUIRED_TABLES`), and every table's Parquet footer
intact. Anything else (no summary, a damaged or missing table) is not done, and is trained again on resume.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pandas is imported where tables are read: `ablate validate` never needs it
    import pandas as pd

DONE_STATUSES = ("completed", "diverged", "pruned")  # results; "failed" arms are retried on resume
STATUSES = DONE_STATUSES + ("failed",)
# Every result (completed, diverged, pruned) has these tables (ARCHITECTURE.md section 3); the others
# (time_grads, gates, grad_hist) exist only for some models or capture settings.
REQUIRED_TABLES = ("history", "epochs", "params", "blocks")
TRIALS_DIR = "trials"  # one JSON record per finished trial: workers never write the same file


class StoreError(RuntimeError):
    """The run folder cannot be used (not writable, disk full, locked by another sweep, damaged)."""


def _write_failed(path: Path, err: OSError) -> StoreError:
    hint = " Free some space and rerun the same command to resume." if err.errno in (errno.ENOSPC, errno.EDQUOT) \
        else ""
    return StoreError(f"cannot write {path}: {err.strerror or err}.{hint}")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _write_failed(path, err) from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise _write_failed(path, err) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
    except OSError as err:
        raise _write_failed(path, err) from None
    finally:
        _unlink_quietly(str(tmp))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def _summary(arm_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(summary, problem)``: the summary when it is one, else why not (None, None: no summary yet)."""
    path = Path(arm_dir) / "summary.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"summary.json is unreadable ({type(err).__name__}: {str(err)[:120]})"
    if not isinstance(data, dict):
        return None, f"summary.json is not an arm summary (it holds a {type(data).__name__})"
    if data.get("status") not in STATUSES or not isinstance(data.get("arm_id"), str):
        return None, f"summary.json is not an arm summary (status {data.get('status')!r}, arm_id {data.get('arm_id')!r})"
    return data, None


def read_summary(arm_dir: Path) -> dict[str, Any] | None:
    """Returns the arm's summary, or ``None`` when it is missing, unreadable or not a summary (not complete)."""
    return _summary(arm_dir)[0]


@dataclasses.dataclass
class ArmCheck:
    """What an arm folder holds: its summary (None if it has none) and what is wrong with it as a result."""

    summary: dict[str, Any] | None
    problems: list[str]

    @property
    def done(self) -> bool:
        """A finished result that can be read (status completed, diverged or pruned, nothing damaged)."""
        return self.summary is not None and self.summary["status"] in DONE_STATUSES and not self.problems


def check_arm(arm_dir: Path) -> ArmCheck:
    """Checks an arm folder cheaply: the summary, the required tables, and each table's Parquet footer (a
    file cut short loses its footer). It does not read whole tables (:func:`read_table` does)."""
    arm_dir = Path(arm_dir)
    summary, problem = _summary(arm_dir)
    problems = [problem] if problem else []
    if summary is None and not problems:
        return ArmCheck(None, [])
    if summary is None or summary["status"] in DONE_STATUSES:
        problems += [f"{t}.parquet is missing" for t in REQUIRED_TABLES if not (arm_dir / f"{t}.parquet").exists()]
    for path in sorted(arm_dir.glob("*.parquet")):
        problems += [p for p in [_parquet_problem(path)] if p]
    return ArmCheck(summary, problems)


def _parquet_problem(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        return f"{path.name} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def is_done(arm_dir: Path) -> bool:
    """Whether the arm folder holds a finished, undamaged result (see :func:`check_arm`)."""
    return check_arm(arm_dir).done


def _stored_config(arm_dir: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load((Path(arm_dir) / "arm.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _as_data(config: dict[str, Any]) -> Any:
    import yaml

    return yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # tuples -> lists, as arm.yaml holds them


def is_current(arm_dir: Path, config: dict[str, Any]) -> bool:
    """True when the arm folder holds a finished, undamaged result for exactly ``config`` (a resolved arm
    config as a JSON-able dict, ``arm.config.model_dump(mode="json")``); a changed config is not current."""
    if not is_done(arm_dir):
        return False
    stored = _stored_config(arm_dir)
    # Compared as data, not text: the same config with its mapping keys in another order is the same arm.
    return stored is not None and stored == _as_data(config)


def changed_keys(arm_dir: Path, config: dict[str, Any]) -> list[str] | None:
    """Dotted keys whose value in the folder's ``arm.yaml`` differs from ``config`` (None: no readable
    ``arm.yaml``)."""
    stored = _stored_config(arm_dir)
    if stored is None:
        return None
    out: list[str] = []
    _diff(stored, _as_data(config), "", out)
    return out


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key), out)
    elif a != b:
        out.append(prefix or "(whole config)")


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
            raise StoreError(f"cannot lock {self.root / '.lock'}: {err.strerror}") from None
        try:  # the holder's pid, for the message a second sweep gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as err:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise _write_failed(self.root / ".lock", err) from None
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


def read_table(arm_dir: Path, table: str, summary: dict[str, Any]) -> pd.DataFrame | None:
    """One arm's ``<table>.parquet`` with ``arm_id``, ``seed`` and its grid values as columns; None if the
    arm has no such table.

    Raises:
        StoreError: the file exists but cannot be read (the message names it).
    """
    import pandas as pd

    f = Path(arm_dir) / f"{table}.parquet"
    if not f.exists():
        return None
    try:
        df = pd.read_parquet(f)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors for a damaged file vary
        raise StoreError(f"{f} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    df.insert(0, "arm_id", summary["arm_id"])
    df.insert(1, "seed", summary.get("seed"))
    for k, v in (summary.get("values") or {}).items():
        df[k] = v if not isinstance(v, (list, dict)) else json.dumps(v)
    return df


def load_table(run_dir: Path, table: str, problems: list[str] | None = None) -> pd.DataFrame:
    """Concatenates ``<table>.parquet`` of every arm that has a summary, with ``arm_id`` and grid values.

    A damaged file is left out (and described in ``problems`` when given), never fatal for the others.
    """
    import pandas as pd

    frames = []
    for arm_dir in sorted((Path(run_dir) / "arms").glob("*")):
        summary = read_summary(arm_dir)
        if summary is None:
            continue
        try:
            df = read_table(arm_dir, table, summary)
        except StoreError as err:
            if problems is not None:
                problems.append(str(err))
            continue
        if df is not None:
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


# ------------------------------------------------------------------------------------ search trial records


def write_trial(root: Path, record: dict[str, Any]) -> None:
    """``<root>/trials/<trial id>.json``: the record of one finished trial, written whole (atomically)."""
    write_json(Path(root) / TRIALS_DIR / f"{record['trial']}.json", record)


def read_trials(root: Path) -> list[dict[str, Any]]:
    """The finished trials of a search root, by trial number (``trials.jsonl`` of older searches included);
    an unreadable or foreign record is skipped."""
    root = Path(root)
    by_id: dict[str, dict[str, Any]] = {}
    legacy = root / "trials.jsonl"
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            _add_trial(by_id, line)
    for path in (root / TRIALS_DIR).glob("*.json"):
        try:
            _add_trial(by_id, path.read_text())
        except OSError:
            continue
    return sorted(by_id.values(), key=lambda r: int(r["trial"]))


def _add_trial(by_id: dict[str, dict[str, Any]], text: str) -> None:
    try:
        record = json.loads(text)
        int(record["trial"])
    except (ValueError, TypeError, KeyError):  # written atomically, so only a foreign file can be unreadable
        return
    if isinstance(record, dict) and isinstance(record.get("values", {}), dict):
        by_id[str(record["trial"])] = record


def has_trials(root: Path) -> bool:
    """Whether ``root`` is a search root with at least one finished trial."""
    root = Path(root)
    return (root / "trials.jsonl").exists() or any((root / TRIALS_DIR).glob("*.json"))
