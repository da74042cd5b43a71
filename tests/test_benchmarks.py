"""The benchmark scripts stay runnable (tiny settings; the figures themselves come from `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_capture_overhead_runs_and_writes_json(tmp_path: Path) -> None:
    import capture_overhead

    out = tmp_path / "bench.json"
    assert capture_overhead.main(["--pairs", "1", "--steps", "4", "--cases", "mlp20x256 grads every=1 spe=1",
                                  "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["target"] == 1.05 and r["steps"] == 4 and len(r["ratios"]) == len(r["cpu_ratios"]) == 1
    assert r["ratio_median"] > 0 and r["memory_kind"] in ("analytic", "measured")


@pytest.mark.slow
def test_profile_capture_lists_the_ops_the_probe_adds(capsys: pytest.CaptureFixture) -> None:
    import profile_capture

    assert profile_capture.main(["--steps", "4", "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "L2Loss" in out and "added us" in out
    assert profile_capture.main(["--groups"]) == 0
    assert "gradient norms" in capsys.readouterr().out


def test_deep_trace_runs(capsys: pytest.CaptureFixture) -> None:
    import deep_trace

    assert deep_trace.main(["--depth", "3", "--steps", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("first fit") == 2 and "probe depth 3" in out
