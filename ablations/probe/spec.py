"""The probe's static view of a model: one row per trainable tensor, its blocks in depth order, their taps.

Blocks come from :func:`ablations.probe.discovery.discover`, for any functional or Sequential model (nested
models and keras-hub backbones included). Zoo models tag every layer of repeated block ``i`` as
``block_<i>_<part>`` (:mod:`zoo.blocks`), the exact and preferred path: ``block_<i>_linear`` is the block's
first linear layer (its output is the pre-activation), ``block_<i>_act`` its activation, ``block_<i>_add``
the residual sum ``Add()([skip, branch])``, ``block_<i>_gate`` a highway gate, ``block_<i>_rnn`` a
recurrent layer. Subclassed models get per-tensor rows only.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ablations.instruments.base import ProbeSpec
from ablations.probe.discovery import discover


def series_layer(view: Any) -> str:
    """The layer whose kernel is the block's weight-gradient series (``blocks.pre_layer``): its first linear
    layer (zoo: ``block_<i>_linear``), else its recurrent layer (zoo: ``block_<i>_rnn``)."""
    if view.pre_layer:
        return view.pre_layer
    return f"{view.name}_rnn" if view.recurrent is not None and view.source == "zoo" else ""


def make_spec(model: Any) -> ProbeSpec:
    """The :class:`ProbeSpec` of ``model``: its tensors, its blocks and what can be tapped in them."""
    d = discover(model)
    blocks = pd.DataFrame({"depth": [v.index for v in d.blocks], "block": [v.name for v in d.blocks],
                           "pre_layer": [series_layer(v) for v in d.blocks]})
    return ProbeSpec(net=model, params=d.params_frame(), blocks=blocks, views=d.blocks, notes=list(d.notes),
                     inputs=d.inputs, outputs=d.outputs, outputs_struct=d.outputs_struct,
                     output_names=d.output_names)
