"""Custom Keras layers of the zoo, one per file, registered serializable under the ``gradzoo`` package.

Importing this package registers them, so ``keras.saving.load_model`` can rebuild a saved zoo model
(``import zoo.layers`` before loading a ``.keras`` file in a fresh process).
"""

from zoo.layers.highway import HighwayMix
from zoo.layers.rezero import ReZero
from zoo.layers.shortcut import PadShortcut
from zoo.layers.stochastic_depth import StochasticDepth

__all__ = ["HighwayMix", "PadShortcut", "ReZero", "StochasticDepth"]
