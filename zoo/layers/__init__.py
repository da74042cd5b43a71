"""Custom Keras layers of the zoo, one per file, registered serializable under the ``gradzoo`` package.

Importing this package registers them, so ``keras.saving.load_model`` can rebuild a saved zoo model
(``import zoo.layers`` before loading a ``.keras`` file in a fresh process; it also registers the
recurrent initializers of :mod:`zoo.rnn_init`).
"""

from zoo.layers.highway import HighwayMix
from zoo.layers.positions import *  # noqa: F401,F403 - transformer positions
from zoo.layers.rezero import ReZero
from zoo.layers.rezero_alpha import *  # noqa: F401,F403 - transformer ReZero scalar
from zoo.layers.shortcut import PadShortcut
from zoo.layers.stochastic_depth import StochasticDepth
import zoo.rnn_init  # noqa: E402,F401 - RecurrentInitializer, GateBias

__all__ = ["HighwayMix", "PadShortcut", "ReZero", "StochasticDepth"]
