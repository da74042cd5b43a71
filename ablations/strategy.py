"""Where an arm runs: tf.distribute strategies and mixed precision from the config's ``runtime`` section.

``runtime.strategy``:

* ``auto``: TPUStrategy when a TPU cluster resolves (``runtime.tpu``, ``$TPU_NAME`` or a TPU VM), else
  MirroredStrategy over all GPUs when there are several, else the default strategy;
* ``default``: TensorFlow's default strategy (one device, TensorFlow's placement);
* ``one_device``: OneDeviceStrategy on ``runtime.device`` (default: the first GPU, else the CPU);
* ``mirrored``: MirroredStrategy over ``runtime.devices`` (default: all GPUs, else all logical CPUs; with
  ``runtime.logical_cpus: N`` the CPU is split into N logical devices, which is how it is tested on CPU);
* ``multi_worker``: MultiWorkerMirroredStrategy, cluster and role from ``$TF_CONFIG``;
* ``tpu``: TPUStrategy through ``TPUClusterResolver(runtime.tpu)``.

A strategy that cannot start raises :class:`StrategyError` saying what was found. The global batch size is
the YAML's ``data.batch_size`` under every strategy: Keras splits each batch across the replicas.

Logical CPU devices and multi-worker collectives must be configured before TensorFlow initialises its
devices, so :func:`configure_devices` is called at process start (the CLI and the sweep engine do it) and
strategies that hold process-wide state (multi_worker, tpu) are created once per process and reused.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from .quiet import native_logs_silenced

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

_PROCESS_STRATEGIES: dict[tuple[str, str], Any] = {}  # multi_worker / tpu: one per process


class StrategyError(RuntimeError):
    """A strategy or device setup that cannot start; the message says what was requested and what was found."""


# ----------------------------------------------------------------------------------------------- devices


def configure_devices(runtime: Any) -> None:
    """Process-start setup: ``runtime.logical_cpus`` logical CPUs; the multi_worker strategy's collectives.

    Must run before TensorFlow initialises its devices (before the first op of the process); a no-op when
    there is nothing to set up or it is already done.

    Raises:
        StrategyError: TensorFlow already started with a different number of logical CPUs, or too early
            for multi_worker collectives, or a bad ``$TF_CONFIG``.
    """
    _logical_cpus(getattr(runtime, "logical_cpus", None))
    if getattr(runtime, "strategy", None) == "multi_worker":
        _multi_worker()  # MultiWorkerMirroredStrategy configures collectives: only possible at process start


def set_op_determinism(on: bool) -> None:
    """Turns TF op determinism on or off for the next arm (``runtime.deterministic``).

    TensorFlow only offers ``enable`` publicly; the setting is process-wide, so without turning it off again
    one deterministic arm would make every later arm of the process deterministic (and silently non-XLA).
    """
    import tensorflow as tf

    from ablations import compat

    if on:
        tf.config.experimental.enable_op_determinism()
    elif compat.op_determinism_enabled():
        compat.disable_op_determinism()


def _logical_cpus(n: int | None) -> None:
    if not n or n <= 1:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return
        raise StrategyError(
            f"runtime.logical_cpus: {n} was requested, but TensorFlow has already initialised its devices in "
            f"this process with {have} logical CPU(s). Logical devices can only be set at process start: run "
            f"through `ablate run` (it sets them before TensorFlow starts), or call "
            f"ablations.strategy.configure_devices(runtime) before any TensorFlow op; every arm of one "
            f"process must use the same runtime.logical_cpus."
        ) from None


def _available(kind: str | None = None) -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices(kind)]


def _canonical(device: str, field: str) -> str:
    """``'/gpu:1'``, ``'GPU:1'`` or ``'/device:GPU:1'`` -> the available logical device name, or an error."""
    import tensorflow as tf

    try:
        spec = tf.DeviceSpec.from_string(device if device.startswith("/") else f"/device:{device}")
    except ValueError:
        spec = None
    want = (spec.device_type or "").upper() if spec else ""
    idx = spec.device_index if spec and spec.device_index is not None else 0
    for name in _available():
        d = tf.DeviceSpec.from_string(name)
        if d.device_type.upper() == want and d.device_index == idx:
            return name
    raise StrategyError(f"{field} '{device}' is not available; found: {', '.join(_available()) or 'no devices'}. "
                        f"Write devices as /gpu:0, /cpu:0 (`runtime.logical_cpus: N` splits the CPU into N).")


# ------------------------------------------------------------------------------------------- strategies


def make_strategy(runtime: Any) -> Any:
    """The ``tf.distribute.Strategy`` for a :class:`~ablations.config.RuntimeConfig`.

    Raises:
        StrategyError: the strategy cannot start here (no TPU, bad TF_CONFIG, unknown device); the message
            says what was found.
    """
    import tensorflow as tf

    name = runtime.strategy
    if name == "auto":
        return _auto(runtime)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = _available("GPU")
        device = runtime.device or (gpus[0] if gpus else _available("CPU")[0])
        return tf.distribute.OneDeviceStrategy(_canonical(device, "runtime.device"))
    if name == "mirrored":
        return _mirrored(runtime.devices)
    if name == "multi_worker":
        return _multi_worker()
    if name == "tpu":
        return _tpu(runtime.tpu)
    raise StrategyError(f"unknown runtime.strategy '{name}'; allowed: {', '.join(STRATEGIES)}")


def _mirrored(devices: list[str] | None) -> Any:
    import tensorflow as tf

    if devices:
        names = [_canonical(d, "runtime.devices entry") for d in devices]
        if len(set(names)) != len(names):
            raise StrategyError(f"runtime.devices lists a device twice: {devices}")
    else:
        names = _available("GPU") or _available("CPU")
    # Cross-device reduction: NCCL only on several GPUs; CPU replicas (logical CPUs in tests) reduce on host.
    ops = None if all("GPU" in n.upper() for n in names) and len(names) > 1 else \
        tf.distribute.ReductionToOneDevice(reduce_to_device=_available("CPU")[0])
    return tf.distribute.MirroredStrategy(names, cross_device_ops=ops)


def _auto(runtime: Any) -> Any:
    import tensorflow as tf

    if _tpu_hint(runtime.tpu):
        try:
            return _tpu(runtime.tpu)
        except StrategyError:
            pass  # "TPU if a TPU cluster resolves": fall back to GPUs / default
    gpus = _available("GPU")
    if len(gpus) > 1:
        return _mirrored(None)
    return tf.distribute.get_strategy()


def _tpu_hint(tpu: str | None) -> bool:
    """True when a TPU may be reachable: a name is given, or this is a TPU VM (``/dev/accel*``, ``/dev/vfio``)."""
    return bool(tpu or os.environ.get("TPU_NAME") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


TPU_CONNECT_TIMEOUT_S = 15.0  # TensorFlow's own connect waits forever (timeout 0) on an address nobody serves


def _check_reachable(resolver: Any) -> None:
    """Raises ConnectionError unless every TPU worker address accepts a TCP connection within the timeout."""
    import socket

    workers = resolver.cluster_spec().as_dict().get("worker", []) if resolver.master() else []
    for address in workers:
        host, _, port = str(address).rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=TPU_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as err:
            raise ConnectionError(f"TPU worker {address} is not reachable within {TPU_CONNECT_TIMEOUT_S:.0f} s "
                                  f"({type(err).__name__}: {err})") from None


def _tpu(tpu: str | None) -> Any:
    key = ("tpu", tpu or "")
    if key in _PROCESS_STRATEGIES:
        return _PROCESS_STRATEGIES[key]
    import tensorflow as tf

    target = tpu or os.environ.get("TPU_NAME") or ("local" if _tpu_hint(None) else "")
    # Physical devices, listed before connecting: a failed connect_to_cluster leaves the eager context
    # pointing at the dead cluster, so listing logical devices afterwards raises the connection error again.
    with native_logs_silenced():  # listing starts the CUDA platform, which logs "failed call to cuInit"
        here = ", ".join(d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices())
    try:
        with native_logs_silenced():  # the error reaches us as the exception; absl would print it again
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=target)
            _check_reachable(resolver)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StrategyError(
            f"runtime.strategy tpu: no TPU could be started. Asked for runtime.tpu={tpu!r} "
            f"($TPU_NAME={os.environ.get('TPU_NAME')!r}, TPU VM devices /dev/accel*: "
            f"{'yes' if glob.glob('/dev/accel*') else 'none'}); devices here: {here}. "
            f"Cause: {type(err).__name__}: {first}. Set runtime.tpu to the TPU name or grpc:// address, "
            f"or use runtime.strategy auto/default."
        ) from None
    _PROCESS_STRATEGIES[key] = strategy
    return strategy


# ------------------------------------------------------------------------------------------ multi-worker


def parse_tf_config(text: str | None = None) -> dict[str, Any]:
    """Parses and checks ``$TF_CONFIG`` (``{"cluster": {"worker": [host:port, ...]}, "task": {...}}``).

    Raises:
        StrategyError: missing, not JSON, or inconsistent; the message shows what was found.
    """
    text = os.environ.get("TF_CONFIG") if text is None else text
    hint = ('expected e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\' on each worker (index = its position in the list)')
    if not text or not text.strip():
        raise StrategyError(f"runtime.strategy multi_worker needs $TF_CONFIG, found it unset or empty; {hint}")
    try:
        cfg = json.loads(text)
    except ValueError as err:
        raise StrategyError(f"$TF_CONFIG is not valid JSON ({err}); found: {text[:200]!r}; {hint}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict) or not cfg["cluster"]:
        raise StrategyError(f"$TF_CONFIG has no 'cluster' mapping; found: {text[:200]!r}; {hint}")
    cluster, task = cfg["cluster"], cfg.get("task")
    roles = [r for r in cluster if r in ("chief", "worker")]
    if not roles:
        raise StrategyError(f"$TF_CONFIG cluster has no 'worker' or 'chief' list; found roles {sorted(cluster)}; {hint}")
    for role, addrs in cluster.items():
        if not isinstance(addrs, list) or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit()
                                                   for a in addrs):
            raise StrategyError(f"$TF_CONFIG cluster['{role}'] must be a list of 'host:port' strings; "
                                f"found {addrs!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise StrategyError(f"$TF_CONFIG has no task {{'type', 'index'}}; found task={task!r}; {hint}")
    if task["type"] not in cluster:
        raise StrategyError(f"$TF_CONFIG task type '{task['type']}' is not in the cluster (roles: "
                            f"{', '.join(sorted(cluster))})")
    n = len(cluster[task["type"]])
    if not isinstance(task["index"], int) or not 0 <= task["index"] < n:
        raise StrategyError(f"$TF_CONFIG task index {task['index']!r} is out of range: cluster['{task['type']}'] "
                            f"has {n} address(es)")
    return cfg


def is_chief(tf_config: dict[str, Any] | None = None) -> bool:
    """The multi-worker process that writes results: the ``chief``, else worker 0 (TensorFlow's convention)."""
    cfg = tf_config or parse_tf_config()
    task, cluster = cfg["task"], cfg["cluster"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster


def _multi_worker() -> Any:
    key = ("multi_worker", os.environ.get("TF_CONFIG", ""))
    if key in _PROCESS_STRATEGIES:
        return _PROCESS_STRATEGIES[key]
    parse_tf_config()
    import tensorflow as tf

    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except Exception as err:
        late = "startup" in str(err)
        raise StrategyError(
            f"runtime.strategy multi_worker could not start from $TF_CONFIG={os.environ.get('TF_CONFIG')!r}: "
            f"{type(err).__name__}: {err}" + (". It must be created before any TensorFlow op: run through "
                                              "`ablate run`, or call ablations.strategy.configure_devices(runtime) "
                                              "first thing in the process" if late else "")) from None
    _PROCESS_STRATEGIES[key] = strategy
    return strategy


def shard_data(strategy: Any, dataset: Any) -> Any:
    """Shards a batched dataset by batches across workers (the data is one cached file: FILE sharding fails)."""
    import tensorflow as tf

    if dataset is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return dataset
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(opts)


# -------------------------------------------------------------------------------------------- precision


def apply_precision(net: Any, policy: str) -> Any:
    """The model with every layer on the dtype policy ``policy`` (same names, same weights); float32: as is.

    Zoo builders pin their layers to ``dtype="float32"`` (or float64 for precise studies), which a global
    policy does not override, so the model is cloned with the policy in each layer's config. Variables stay
    float32 under a mixed policy; ``compile`` then wraps the optimizer in a ``LossScaleOptimizer``.

    Raises:
        StrategyError: the model has float64 layers (``model.dtype: float64``) and a mixed policy is asked.
    """
    if policy == "float32":
        return net
    import keras

    wide = [layer.name for layer in net.layers if getattr(layer, "dtype_policy", None) is not None
            and layer.dtype_policy.variable_dtype == "float64"]
    if wide:
        raise StrategyError(f"runtime.precision {policy} cannot be combined with float64 layers ({wide[0]}, ...): "
                            f"leave model.dtype at float32 or use runtime.precision float32")

    def clone(layer: Any) -> Any:
        cfg = layer.get_config()
        if "dtype" in cfg:
            cfg["dtype"] = policy
        return layer.__class__.from_config(cfg)

    mixed = keras.models.clone_model(net, clone_function=clone)
    mixed.set_weights(net.get_weights())
    return mixed
