"""Chief and workers for keras-tuner oracles: the distributed half of the sweep engine.

Knows nothing about arms or searches: :func:`serve_oracle` serves any keras-tuner oracle over gRPC (keras-tuner's
own servicer), starts local worker processes with a caller-given command line, reports every trial as it
ends, fails the trial of a local worker that died, and returns when the search is over. ``ablate run
--workers`` (:mod:`ablations.sweep`) and ``ablate tune --workers`` (:mod:`ablations.tune`) both use it;
:func:`process_role` reads the ``KERASTUNER_*`` variables that make a process a chief or a worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ablations import compat


def _kt():
    import keras_tuner as kt

    return kt


class SweepError(RuntimeError):
    """The sweep cannot run as asked (bad worker setup, config differs from the chief's)."""


def process_role(workers: int = 0) -> str:
    """This process's part in a distributed run, from ``--workers`` and the ``KERASTUNER_*`` variables.

    Returns:
        ``"worker"`` (``KERASTUNER_ORACLE_IP`` set, ``KERASTUNER_TUNER_ID`` without "chief"), ``"chief"``
        (``workers > 0``, or a chief started by hand) or ``"local"`` (everything in this process).

    Raises:
        SweepError: ``workers`` was given to a worker (only a chief starts local workers).
    """
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "")
    distributed = bool(os.environ.get("KERASTUNER_ORACLE_IP"))
    if distributed and "chief" not in tuner_id:
        if workers:
            raise SweepError(f"--workers is for the chief; this process is worker {tuner_id!r} "
                             f"(KERASTUNER_TUNER_ID without 'chief')")
        return "worker"
    return "chief" if workers or distributed else "local"


def search_loop(tuner: Any) -> None:
    """keras-tuner's search loop for a tuner whose ``run_trial`` takes no data, in any process role.

    keras-tuner's own loop re-asks at once when the oracle is IDLE (all work handed out, some still running):
    over gRPC that is a busy loop, so this one waits a little instead. Its chief branch (a server that polls
    every 20 s) is never taken: a chief serves through :func:`serve_oracle`.
    """
    kt = _kt()
    status = kt.engine.trial.TrialStatus
    if not compat.is_worker(tuner):
        tuner.oracle.verbose = 0  # the sweep UI reports trials
    while True:
        trial = tuner.oracle.create_trial(tuner.tuner_id)
        if trial.status == status.STOPPED:
            break
        if trial.status == status.IDLE:
            time.sleep(0.5)
            continue
        tuner.on_trial_begin(trial)
        compat.run_and_update_trial(tuner, trial)
        tuner.on_trial_end(trial)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def chief_address() -> tuple[str, int, str]:
    """``(ip to listen on, port, ip local workers connect to)``: the ``KERASTUNER_*`` variables of a chief
    started by hand, else loopback and a free port."""
    ip = os.environ.get("KERASTUNER_ORACLE_IP", "127.0.0.1")
    port = int(os.environ.get("KERASTUNER_ORACLE_PORT") or free_port(ip if ip != "0.0.0.0" else ""))
    return ip, port, "127.0.0.1" if ip == "0.0.0.0" else ip


def _serve(oracle: Any, ip: str, port: int, facts: dict[str, str] | None = None) -> tuple[Any, Any]:
    """Serves ``oracle`` on ``ip:port``; returns ``(server, servicer)`` (the servicer knows if a worker was
    told to stop)."""
    import grpc
    from concurrent import futures


    # keras-tuner's own servicer; its start_server() is not used because it polls only every 20 s.
    servicer = compat.oracle_servicer(_Announcing(oracle, facts) if facts else oracle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    compat.tuner_protos().get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{ip}:{port}") == 0:
        raise SweepError(f"the chief cannot listen on {ip}:{port} (port in use or address not local); set "
                         f"KERASTUNER_ORACLE_PORT to a free port")
    server.start()
    return server, servicer


class _Announcing:
    """The oracle as workers see it: ``get_space`` also carries fixed ``facts`` (which search this is, the
    config digest), so a worker started by hand learns what to run from the chief itself.

    The facts are added to a copy of the space only: the oracle's own space, and so its trials' values, stay
    as they are (resume and ``best.yaml`` never see them).
    """

    def __init__(self, oracle: Any, facts: dict[str, str]) -> None:
        self._oracle = oracle
        self._facts = facts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._oracle, name)

    def get_space(self) -> Any:
        hp = self._oracle.get_space()
        for key, value in self._facts.items():
            hp.Fixed(key, value)
        return hp


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i in range(sum(line.startswith("GPU") for line in out.splitlines()))]
    return []


def _death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that kills a local worker when the chief dies (Linux), so no orphan waits for it."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded here: nothing to import after fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_env(i: int, n: int, ip: str, port: int, gpus: list[str]) -> dict[str, str]:
    """Environment of local worker ``i`` of ``n``: its tuner id, the chief's address, its devices or threads."""
    env = dict(os.environ, KERASTUNER_TUNER_ID=f"worker-{i}", KERASTUNER_ORACLE_IP=ip,
               KERASTUNER_ORACLE_PORT=str(port))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i::n] or [gpus[i % len(gpus)]])
    else:  # split the CPU: n processes each with all cores would oversubscribe it
        threads = str(max(1, (os.cpu_count() or 1) // n))
        env.update(TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS=threads, OMP_NUM_THREADS=threads)
    return env


def serve_oracle(oracle: Any, *, command: list[str], workers: int, logs: Path, on_end: Callable[[Any], None],
                 done: Callable[[], bool] | None = None, facts: dict[str, str] | None = None,
                 poll_s: float = 0.2, linger_s: float = 10.0) -> bool:
    """The chief's part of a distributed search: serves ``oracle`` over gRPC until the search is over.

    Starts ``workers`` local processes running ``command`` (with :func:`worker_env`; each one's output goes to
    ``logs/worker-<i>.log``), calls ``on_end(trial)`` for every trial that ends, in the order they end, and
    fails the running trial of a local worker that exited (``on_end`` then sees it ``FAILED`` with a message
    naming the worker and its log). Workers started by hand with the same ``KERASTUNER_*`` address may join.

    Args:
        oracle: a local keras-tuner oracle (its state, and so resume, is the caller's).
        command: the command line of a local worker.
        workers: how many local workers to start.
        logs: folder of the workers' logs.
        on_end: called with each ended trial.
        done: says when the search is over (default: the oracle told a worker to stop and no trial runs).
        facts: fixed values workers read from the served space (:class:`_Announcing`).
        poll_s: how often the chief looks at the oracle and the workers.
        linger_s: how long to go on serving after the end, so that workers still running (started by hand)
            hear "stop" instead of waiting for a chief that is gone.

    Returns:
        True when the search ended; False when every local worker exited before that and none can join.
    """
    ip, port, connect_ip = chief_address()
    # Workers first (forking before gRPC starts its threads); they wait until the chief answers.
    procs = _spawn_workers(command, workers, logs, connect_ip, port)
    try:
        server, servicer = _serve(oracle, ip, port, facts)
    except BaseException:
        _stop(procs, wait_s=0)
        raise
    try:
        over = done or (lambda: servicer.stop_triggered and not oracle.ongoing_trials)
        # Started with --workers alone, no other worker can join: stop when the local ones are gone.
        only_local = not os.environ.get("KERASTUNER_ORACLE_IP")
        ended = _watch(oracle, procs, on_end, over, logs, poll_s, only_local)
        if ended:
            _linger(oracle, procs, linger_s)
        return ended
    finally:
        _stop(procs)
        server.stop(grace=1)


def _spawn_workers(command: list[str], n: int, logs: Path, ip: str, port: int) -> dict[str, subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _gpu_ids()
    hook = _death_signal()
    procs = {}
    for i in range(n):
        with open(logs / f"worker-{i}.log", "w") as log:
            procs[f"worker-{i}"] = subprocess.Popen(command, env=worker_env(i, n, ip, port, gpus), stdout=log,
                                                    stderr=subprocess.STDOUT, preexec_fn=hook)
    return procs


def _watch(oracle: Any, procs: dict[str, subprocess.Popen], on_end: Callable[[Any], None],
           done: Callable[[], bool], logs: Path, poll_s: float, only_local: bool) -> bool:
    """Reports trials as they end and fails the trial of a local worker that died, until ``done()`` (True)
    or until no local worker is left and nothing runs (False)."""
    seen = 0
    while True:
        seen = _report_ended(oracle, seen, on_end)
        if done():
            _report_ended(oracle, seen, on_end)
            return True
        _fail_dead(oracle, procs, logs)
        if only_local and procs and all(p.poll() is not None for p in procs.values()) and \
                not oracle.ongoing_trials and len(oracle.end_order) == seen:
            return False
        time.sleep(poll_s)


def _report_ended(oracle: Any, seen: int, on_end: Callable[[Any], None]) -> int:
    for tid in list(oracle.end_order[seen:]):
        seen += 1
        on_end(oracle.trials[tid])
    return seen


def _fail_dead(oracle: Any, procs: dict[str, subprocess.Popen], logs: Path) -> None:
    """Ends the running trial of every local worker that exited: nobody else would, and the chief would wait."""
    kt = _kt()
    for tuner_id, proc in procs.items():
        if proc.poll() is not None and tuner_id in oracle.ongoing_trials:
            trial = oracle.ongoing_trials[tuner_id]
            trial.status = kt.engine.trial.TrialStatus.FAILED
            trial.message = f"{tuner_id} exited (code {proc.returncode}) during this trial; see {logs / tuner_id}.log"
            oracle.end_trial(trial)


def _linger(oracle: Any, procs: dict[str, subprocess.Popen], seconds: float) -> None:
    """Serves on until every worker that asked for work has been told to stop (keras-tuner's ``tuner_ids``),
    dead local workers aside, or ``seconds`` pass."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(t not in procs or procs[t].poll() is None for t in set(oracle.tuner_ids)):
        time.sleep(0.1)


def _stop(procs: dict[str, subprocess.Popen], wait_s: float = 15) -> None:
    deadline = time.time() + wait_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
