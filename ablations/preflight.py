"""Checks every input once, before any arm trains: each distinct dataset and each distinct device setup.

Without it a dataset that cannot be prepared (a catalog name with no network: ~205 s of download retries),
a missing split, a batch larger than the data or an unreachable TPU is found again by every arm, each
recorded as failed. Here it stops the sweep at once with a :class:`~ablations.data.DataError` or
:class:`~ablations.strategy.StrategyError` (exit code 2). Datasets are prepared here, in one process, before
any worker starts (several processes preparing one TFDS data dir at once race each other).
"""

from __future__ import annotations

import json
from typing import Any, Iterable


def _distinct(sections: Iterable[tuple[str, Any]]) -> dict[str, tuple[str, Any]]:
    """``{canonical JSON: (first arm id, section)}``."""
    out: dict[str, tuple[str, Any]] = {}
    for arm_id, section in sections:
        out.setdefault(json.dumps(section.model_dump(mode="json"), sort_keys=True), (arm_id, section))
    return out


def check_data(datas: Iterable[tuple[str, Any, str]]) -> None:
    """Opens each distinct ``(arm id, DataConfig, train.loss)``'s dataset once; raises DataError naming the
    first arm that uses it, also for a loss that cannot read its targets (cross-entropy on regression)."""
    from ablations.data import DataError, check
    from ablations.factories import loss_problem

    infos: dict[str, Any] = {}
    by_loss: dict[tuple[str, str], tuple[str, Any]] = {}
    for arm_id, data, loss in datas:
        by_loss.setdefault((json.dumps(data.model_dump(mode="json"), sort_keys=True), loss), (arm_id, data))
    for (key, loss), (arm_id, data) in by_loss.items():
        try:
            if key not in infos:
                infos[key] = check(data)
        except DataError as err:
            raise DataError(f"{err} (data of arm {arm_id}; nothing was trained)") from None
        problem = loss_problem(loss, infos[key].task, f"dataset '{data.name}'")
        if problem:
            raise DataError(f"{problem} (arm {arm_id}; nothing was trained)")


def check_devices(runtimes: Iterable[tuple[str, Any]]) -> None:
    """Starts each distinct strategy that names hardware (tpu, one_device, mirrored) and parses $TF_CONFIG
    for multi_worker; raises StrategyError saying what was found. Run only in the process that trains: a
    chief that merely serves workers must not claim the accelerators."""
    from ablations.strategy import StrategyError, make_strategy, parse_tf_config

    for arm_id, runtime in _distinct(runtimes).values():
        try:
            if runtime.strategy == "multi_worker":
                parse_tf_config()
            elif runtime.strategy in ("tpu", "one_device", "mirrored"):
                make_strategy(runtime)  # cached per process for TPUs: the arm reuses it
        except StrategyError as err:
            raise StrategyError(f"{err} (runtime of arm {arm_id}; nothing was trained)") from None


def check_inputs(arms: list[Any], *, trains_here: bool) -> None:
    """:func:`check_data` for every arm, and :func:`check_devices` when this process trains them."""
    check_data((a.id, a.config.data, a.config.train.loss) for a in arms)
    if trains_here:
        check_devices((a.id, a.config.runtime) for a in arms)
