"""The probe's static view of a model: one row per trainable tensor, the blocks in depth order, their taps.

Zoo models tag every layer of repeated block ``i`` as ``block_<i>_<part>`` (:mod:`zoo.blocks`), the exact and
preferred path: ``block_<i>_linear`` is the block's first linear layer (its output is the pre-activation),
``block_<i>_act`` its activation, ``block_<i>_add`` the residual sum ``Add()([skip, branch])``,
``block_<i>_gate`` a highway gate, ``block_<i>_rnn`` a recurrent layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

import zoo
from ablations.instruments.base import BlockView, ProbeSpec

PARAM_COLUMNS = ["depth", "block", "layer", "param", "role", "size"]
SCALAR_WEIGHTS = ("alpha", "active")


def param_table(model: Any) -> pd.DataFrame:
    """One row per trainable tensor of ``model`` (``model.trainable_variables`` order)."""
    layer_of = {}
    for layer in model.layers:
        for v in layer.trainable_weights:
            layer_of.setdefault(id(v), layer.name)
    rows = []
    for v in model.trainable_variables:
        layer_name = layer_of.get(id(v), v.path.split("/")[0])
        role, depth = zoo.layer_role(layer_name)
        parsed = zoo.parse_layer_name(layer_name)
        block = layer_name[: -len(parsed[1]) - 1] if parsed else layer_name
        rows.append(dict(depth=depth, block=block, layer=layer_name, param=v.name, role=role,
                         size=int(np.prod(v.shape)), path=v.path))
    params = pd.DataFrame(rows, columns=[*PARAM_COLUMNS, "path"])
    # Layers with several tensors of one name (attention: query/key/value/output kernels) keep the path
    # below the layer, e.g. "query/kernel", so every row names one tensor.
    dup = params.duplicated(["layer", "param"], keep=False)
    params.loc[dup, "param"] = params.loc[dup, "path"].str.split("/", n=1).str[1]
    return params.drop(columns="path")


def zoo_views(model: Any) -> list[BlockView]:
    """The :class:`BlockView` of every tagged block of a zoo model."""
    views = []
    for b in zoo.blocks(model):
        add = b.layers.get("add")
        pair = add.input if add is not None and isinstance(add.input, (list, tuple)) and len(add.input) == 2 else None
        scalars = {w.name: w for layer in b.layers.values() for w in layer.weights
                   if w.name in SCALAR_WEIGHTS and tuple(w.shape) == ()}
        views.append(BlockView(
            index=b.index, name=b.prefix, layers=dict(b.layers),
            pre=b.linear.output if b.linear is not None else None,
            act=b.act, act_input=b.act.input if b.act is not None else None,
            skip=pair[0] if pair else None, branch=pair[1] if pair else None,  # zoo convention: Add()([skip, branch])
            gate=b.layers["gate"].output if "gate" in b.layers else None,
            scalars=scalars, recurrent=b.layers.get("rnn")))
    return views


def make_spec(model: Any) -> ProbeSpec:
    """The :class:`ProbeSpec` of ``model``: its tensors, its blocks and what can be tapped in them."""
    views = zoo_views(model)
    blocks = pd.DataFrame({"depth": [v.index for v in views], "block": [v.name for v in views]})
    notes = [] if views else ["no blocks found: name a block's layers block_<i>_<part> (block_<i>_linear for its "
                              "first linear layer) to get per-block statistics"]
    return ProbeSpec(net=model, params=param_table(model), blocks=blocks, views=views, notes=notes)
