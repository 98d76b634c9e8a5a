"""LeNet-style convolutional classifier (LeCun et al., 1998, "Gradient-based learning
applied to document recognition"), with ReLU, max pooling and dropout as is usual today.

[conv 3x3 -> relu -> max-pool 2x2] x len(features) -> dropout -> dense -> relu -> dropout -> dense.
"""
from typing import Sequence

import flax.linen as nn
import jax


class CNN(nn.Module):
  num_classes: int
  features: Sequence[int] = (32, 64)
  dense_size: int = 128
  dropout_rate: float = 0.25

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    h = x_BxHxWxC
    for f in self.features:
      h = nn.relu(nn.Conv(f, kernel_size=(3, 3), padding='SAME')(h))
      h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding='SAME')
    h_BxD = h.reshape(h.shape[0], -1)
    h_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxD)
    h_BxD = nn.relu(nn.Dense(self.dense_size)(h_BxD))
    h_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxD)
    return nn.Dense(self.num_classes)(h_BxD)
