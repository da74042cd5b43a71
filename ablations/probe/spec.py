"""The probe's static view of a model: one row per trainable tensor, its blocks in depth order, their taps.

Blocks come from :func:`ablations.probe.discovery.discover`, for any functional or Sequential model (nested
models and keras-hub backbones included). Zoo models tag every layer of repeated block ``i`` as
``block_<i>_<part>`` (:mod:`zoo.blocks`), the exact and preferred path: ``block_<i>_linear`` is the block's
first linear layer (its output is the pre-activation), ``block_<i>_act`` its activation, ``block_<i>_add``
the residual sum ``Add()([skip, branch])``, ``block_<i>_gate`` a highway gate, ``block_<i>_rnn`` a
recurrent layer. Subclassed models get per-tensor rows only.

The per-block weight-gradient series (first/last ratio, decay rate, verdicts) reads one kernel per block. Zoo
blocks name it (``block_<i>_linear`` or ``block_<i>_rnn``, param ``kernel``); for blocks found otherwise the
params table gets a ``block_kernel`` column that marks it (:func:`block_kernel_rows`), so the stored tables
alone still say which row it is.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ablations.instruments.base import ProbeSpec
from ablations.probe.discovery import discover


def make_spec(model: Any) -> ProbeSpec:
    """The :class:`ProbeSpec` of ``model``: its tensors, its blocks and what can be tapped in them."""
    d = discover(model)
    blocks = pd.DataFrame({"depth": [v.index for v in d.blocks], "block": [v.name for v in d.blocks]})
    params = d.params_frame()
    if any(v.source != "zoo" for v in d.blocks):  # zoo tables keep their exact columns
        params["block_kernel"] = block_kernel_rows(params, d.blocks)
    return ProbeSpec(net=model, params=params, blocks=blocks, views=d.blocks, notes=list(d.notes),
                     inputs=d.inputs, outputs=d.outputs, outputs_struct=d.outputs_struct,
                     output_names=d.output_names)


def block_kernel_rows(params: pd.DataFrame, views: list[Any]) -> list[bool]:
    """Which row of ``params`` is each block's kernel of the weight-gradient series (one per block at most).

    Zoo blocks: ``block_<i>_linear``/``block_<i>_rnn``'s ``kernel``. Other blocks: the ``kernel`` of the
    layer tapped as ``pre`` (its first linear or recurrent layer), else that layer's first variable named
    ``...kernel``, else the block's first ``kernel`` in row order (a custom layer's first linear map, e.g. a
    keras-hub transformer layer's query kernel).
    """
    flags = [False] * len(params)
    layer, param = params["layer"].tolist(), params["param"].tolist()
    depth, role = params["depth"].tolist(), params["role"].tolist()
    for v in views:
        rows = [i for i in range(len(params)) if role[i] == "block" and depth[i] == v.index]
        kernels = [i for i in rows if param[i] == "kernel" or param[i].endswith("/kernel")]
        if v.source == "zoo":
            named = {f"{v.name}_linear", f"{v.name}_rnn"}
            choice = [i for i in rows if param[i] == "kernel" and layer[i] in named]
        else:
            tapped = [i for i in rows if layer[i] == v.pre_layer]
            choice = ([i for i in tapped if param[i] == "kernel"] or [i for i in tapped if param[i].endswith("kernel")]
                      or kernels)
        if choice:
            flags[choice[0]] = True
    return flags
