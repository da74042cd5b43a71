"""Process helpers shared by the distributed tests (``ablate run`` and ``ablate tune`` chiefs and workers)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ablations.sweep import free_port


def chief_and_hand_worker(cmd: list[str], cwd: Path | None = None, timeout_s: float = 300) -> tuple[str, str]:
    """Runs ``cmd --workers 1`` as a chief started by hand (``KERASTUNER_*`` on loopback) next to one worker
    started by hand with the same command; asserts both exit 0 and returns ``(chief output, worker output)``."""
    base = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    chief = subprocess.Popen(cmd + ["--workers", "1"], cwd=cwd, env={**base, "KERASTUNER_TUNER_ID": "chief"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    other = subprocess.Popen(cmd, cwd=cwd, env={**base, "KERASTUNER_TUNER_ID": "worker-by-hand"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        other_out = other.communicate(timeout=timeout_s)[0]
        chief_out = chief.communicate(timeout=120)[0]
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert chief.returncode == 0, chief_out[-3000:]
    assert other.returncode == 0, other_out[-3000:]
    return chief_out, other_out
