"""LeNet-style convolutional classifier (LeCun et al., 1998, "Gradient-based learning
applied to document recognition"), with ReLU, max pooling and dropout as is usual today.

[conv 3x3 -> relu -> max-pool 2x2] x len(features) -> dropout -> dense -> relu -> dropout -> dense.
The conv layers are block_0, block_1, ..., the hidden dense layer the next block, the last dense
layer `cls_head`.
"""
from typing import Sequence

import flax.linen as nn
import jax

from model_zoo.models import layers


class CNN(nn.Module):
  num_classes: int
  features: Sequence[int] = (32, 64)
  dense_size: int = 128
  dropout_rate: float = 0.25

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    h = x_BxHxWxC
    for i, f in enumerate(self.features):
      h = nn.relu(layers.conv(f, 3, name=f'block_{i}')(h))
      h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding='SAME')
    h_BxD = h.reshape(h.shape[0], -1)
    h_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxD)
    h_BxF = nn.relu(layers.linear(self.dense_size, f'block_{len(self.features)}')(h_BxD))
    h_BxF = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxF)
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None))(h_BxF)
