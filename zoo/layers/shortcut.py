"""Parameter-free shortcut of the CIFAR ResNets, "option A" (He et al. 2016, section 4.2).

When a stage halves the resolution and doubles the filters, the identity shortcut subsamples ``x`` with the
stride and pads the new channels with zeros, so the skip path adds no parameters.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="gradzoo")
class PadShortcut(keras.layers.Layer):
    """Subsamples an NHWC tensor by ``stride`` and zero-pads its channels to ``channels`` (split evenly).

    Args:
        channels: output channels (>= input channels).
        stride: spatial subsampling factor.
    """

    def __init__(self, channels: int, stride: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.channels, self.stride = int(channels), int(stride)

    def call(self, x: Any) -> Any:
        x = x[:, :: self.stride, :: self.stride, :]
        extra = self.channels - x.shape[-1]
        if extra < 0:
            raise ValueError(f"PadShortcut cannot shrink {x.shape[-1]} channels to {self.channels}")
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape: Any) -> Any:
        b, h, w, _ = input_shape
        sub = lambda n: None if n is None else -(-n // self.stride)  # noqa: E731  (ceil, as x[::s])
        return (b, sub(h), sub(w), self.channels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channels": self.channels, "stride": self.stride}
