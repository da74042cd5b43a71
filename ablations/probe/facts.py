"""What a verdict's fixes need to know of a model and its optimizer (:func:`ablations.diagnose.fixes_for`).

Read off the live objects once, stored as plain data in the arm's summary: the element-wise activations of
the hidden layers, the kernel initializers, whether there are residual blocks or normalization layers, the
optimizer's name, rate and clipping, and for zoo models the arch and options (the fixes then become config
keys). Nothing here judges anything.
"""

from __future__ import annotations

import re
from typing import Any

import keras

from ablations import compat
from ablations.probe.blockrules import NORM_TYPES

L = keras.layers


def snake(name: str) -> str:
    """``GlorotUniform`` -> ``glorot_uniform`` (``SGD`` -> ``sgd``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _layers(model: Any) -> list[Any]:
    """Every layer, nested models and custom layers opened."""
    out = []
    for layer in getattr(model, "layers", None) or compat.sublayers(model):
        out.append(layer)
        if isinstance(layer, keras.Model) or compat.sublayers(layer):
            out.extend(_layers(layer))
    return out


def _activation(layer: Any) -> str | None:
    """The element-wise activation a layer applies, by name (None: none, or a recurrent layer's own)."""
    if isinstance(layer, (L.RNN, L.Bidirectional)):
        return None  # tanh/sigmoid gates are the design of LSTM/GRU, not a choice to undo
    named = {L.ReLU: "relu", L.LeakyReLU: "leaky_relu", L.PReLU: "prelu", L.ELU: "elu", L.Softmax: "softmax"}
    for cls, name in named.items():
        if isinstance(layer, cls):
            return name
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None) if callable(fn) else None
    return None if name in (None, "linear") else name


def _outputs(model: Any) -> set[str]:
    names = set(getattr(model, "output_names", None) or [])
    return names | ({model.layers[-1].name} if getattr(model, "layers", None) else set())


def model_facts(net: Any, spec: Any = None) -> dict[str, Any]:
    """Activations (hidden layers only), kernel initializers, residual and normalization of ``net``."""
    layers, out = _layers(net), _outputs(net)
    acts = {a for layer in layers if layer.name not in out and (a := _activation(layer)) not in (None, "softmax")}
    inits = set()
    for layer in layers:
        init = getattr(layer, "kernel_initializer", None)
        if init is not None and layer.name not in out:
            inits.add(snake(type(init).__name__))
    residual = any(v.skip is not None for v in spec.views) if spec is not None else \
        any(isinstance(layer, L.Add) for layer in layers)
    return {"activations": sorted(acts), "initializers": sorted(inits), "residual": bool(residual),
            "normalization": any(isinstance(layer, NORM_TYPES) for layer in layers), "zoo": None}


def optimizer_facts(optimizer: Any) -> dict[str, Any]:
    """Name, (peak) learning rate, momentum, clipping, schedule and warm-up of a Keras optimizer."""
    cfg = optimizer.get_config()
    lr = cfg.get("learning_rate")
    schedule = lr.get("class_name") if isinstance(lr, dict) else None  # a serialized LearningRateSchedule
    warmup = schedule == "LinearWarmup"
    if warmup:
        rate = lr["config"]["peak"]
        after = lr["config"].get("after")
    else:
        rate = keras.ops.convert_to_numpy(optimizer.learning_rate)  # a schedule: its value at the current step
        after = None
    clip = any(cfg.get(k) is not None for k in ("clipnorm", "global_clipnorm", "clipvalue"))
    return {"name": type(optimizer).__name__.lower(), "learning_rate": float(f"{float(rate):.6g}"),
            "momentum": float(cfg.get("momentum") or 0.0), "clipping": clip,
            "schedule": bool(schedule) and (not warmup or isinstance(after, dict)), "warmup": warmup}


def zoo_facts(arch: str, options: dict[str, Any]) -> dict[str, Any]:
    """The facts a zoo config states (its activation, initializer, norm), over the builder's defaults."""
    import zoo

    opts = {k: v[0] for k, v in zoo.options(arch).items()}
    opts.update(options)
    residual = not arch.startswith("plain_") and zoo.family(arch) != "rnn"
    facts: dict[str, Any] = {"residual": residual, "zoo": {"arch": arch, **options}}
    if isinstance(opts.get("activation"), str):
        facts["activations"] = [opts["activation"]]
    if isinstance(opts.get("initializer"), str):
        facts["initializers"] = [opts["initializer"]]
    if "norm" in opts:
        facts["normalization"] = opts["norm"] != "none"
    return facts


def facts_of(net: Any, spec: Any = None, optimizer: Any = None, zoo_model: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Everything :func:`ablations.diagnose.fixes_for` reads; a zoo config's statements win over the layers'."""
    import zoo

    f = model_facts(net, spec)
    if zoo_model is not None and zoo_model.get("arch") in zoo.names():
        f.update(zoo_facts(zoo_model["arch"], {k: v for k, v in zoo_model.items() if k != "arch"}))
    if optimizer is not None:
        f["optimizer"] = optimizer_facts(optimizer)
    return f
