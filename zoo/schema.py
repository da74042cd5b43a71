"""The rules every model option follows, as data (TensorFlow-free): choices, ranges, and which settings a
chosen function ignores.

Builders import their choice tuples from here, so the validator and the builders share one list. Types and
defaults come from the builders' signatures (:mod:`zoo.signatures`); this module adds what a signature cannot
say: ``depth >= 1``, ``dropout`` in [0, 1), the allowed strings, and the :class:`Needs` rules that refuse a
setting the chosen function would silently ignore (``norm_groups: 4`` with ``norm: batch`` would train an
arm identical to ``norm_groups: 8``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from zoo.activations import ACTIVATIONS
from zoo.initializers import INITIALIZERS
from zoo.norms import NORMS
from zoo.rules import Rule

NORM_POSITIONS = ("pre_act", "post_act")  # feedforward: linear -> norm -> act, or linear -> act -> norm
DTYPES = ("float32", "float64")
SHORTCUTS = ("A", "B")  # ResNet CIFAR shortcut options (He et al. 2016)
SURVIVAL_RULES = ("linear", "uniform")  # stochastic depth
DROP_MODES = ("batch", "sample")  # stochastic depth: whole batch (the paper) or per example (DropPath)
# Activations a Keras recurrent cell accepts by name (cells take functions, not layers).
CELL_ACTIVATIONS = ("tanh", "relu", "sigmoid", "hard_sigmoid", "linear", "elu", "selu", "gelu", "silu")
# Recurrent bases: how each square [units, units] gate block is drawn before any spectral rescaling.
RECURRENT_BASES = ("orthogonal", "identity", "glorot_uniform", "glorot_normal", "he_normal", "lecun_normal")
RNN_OUTPUTS = ("last", "sequence")
TRANSFORMER_NORM_POSITIONS = ("pre", "post", "none")
RESIDUALS = ("standard", "rezero")
POSITIONS = ("sinusoidal", "learned", "none")
TRANSFORMER_OUTPUTS = ("mean", "sequence")

POSITIVE = Rule(ge=1)
RATE = Rule(ge=0, lt=1)
ANY_NUMBER = Rule()

# By option name, for every builder that has the option (BUILDER_RULES overrides per builder).
OPTION_RULES: dict[str, Rule] = {
    "depth": POSITIVE, "width": POSITIVE, "units": POSITIVE, "growth_rate": POSITIVE, "stages": POSITIVE,
    "norm_groups": POSITIVE, "d_model": POSITIVE, "heads": POSITIVE, "ffn_width": POSITIVE,
    "vocab_size": POSITIVE,
    "activation": Rule(registry=ACTIVATIONS), "initializer": Rule(registry=INITIALIZERS),
    "norm": Rule(registry=NORMS), "norm_position": Rule(choices=NORM_POSITIONS), "dtype": Rule(choices=DTYPES),
    "dropout": RATE, "recurrent_dropout": RATE, "bias_init_std": Rule(ge=0),
    "branch_scale": Rule(choices=("inv_sqrt_depth",)), "gate_bias": ANY_NUMBER, "alpha_init": ANY_NUMBER,
    "compression": Rule(gt=0, le=1), "survival_prob": Rule(gt=0, le=1),
    "survival_rule": Rule(choices=SURVIVAL_RULES), "mode": Rule(choices=DROP_MODES),
    "shortcut": Rule(choices=SHORTCUTS), "recurrent_initializer": Rule(choices=RECURRENT_BASES),
    "recurrent_gain": ANY_NUMBER, "spectral_radius": Rule(ge=0), "forget_bias": Rule(choices=("unit",)),
    "output": Rule(choices=RNN_OUTPUTS), "residual": Rule(choices=RESIDUALS), "positions": Rule(choices=POSITIONS),
}
_CELLS = {"activation": Rule(choices=CELL_ACTIVATIONS)}
BUILDER_RULES: dict[str, dict[str, Rule]] = {
    "simple_rnn": _CELLS, "lstm": _CELLS, "gru": _CELLS,
    "transformer": {"norm_position": Rule(choices=TRANSFORMER_NORM_POSITIONS),
                    "output": Rule(choices=TRANSFORMER_OUTPUTS)},
}

# Mapping options whose keys are the options of a function chosen by a sibling option.
SUB_OPTIONS = {"activation_options": ("activation", ACTIVATIONS),
               "initializer_options": ("initializer", INITIALIZERS)}


@dataclasses.dataclass(frozen=True)
class Needs:
    """``option`` away from its default has an effect only when ``other``'s value passes ``when``.

    Checked for builders that have both options; ``needed`` says what ``when`` wants, for the message.
    """

    option: str
    other: str
    when: Callable[[Any], bool]
    needed: str


NEEDS = (
    Needs("norm_groups", "norm", lambda v: v == "group", "norm: group"),
    Needs("norm_position", "norm", lambda v: v != "none", "a norm other than none"),
    Needs("compression", "stages", lambda v: isinstance(v, int) and v > 1,
          "stages > 1 (transitions sit between dense blocks)"),
    Needs("recurrent_gain", "spectral_radius", lambda v: v is None,
          "spectral_radius: null (a spectral radius overrides the gain)"),
)


def _heads_divide(opts: dict[str, Any]) -> tuple[str, str] | None:
    d_model, heads = opts.get("d_model"), opts.get("heads")
    if isinstance(d_model, int) and isinstance(heads, int) and heads > 0 and d_model % heads:
        return "heads", f"'d_model' ({d_model}) must be divisible by 'heads' ({heads})"
    return None


# Checks across options: (resolved options) -> (option to blame, message) or None.
CHECKS: dict[str, tuple[Callable[[dict[str, Any]], tuple[str, str] | None], ...]] = {
    "transformer": (_heads_divide,),
}


def rule(builder: str, option: str) -> Rule | None:
    """The rule of ``option`` in ``builder`` (its own override first)."""
    return BUILDER_RULES.get(builder, {}).get(option) or OPTION_RULES.get(option)
