"""Multi-layer perceptron classifier.

h_0 = flatten(x);  h_i = dropout(relu(W_i h_{i-1} + b_i)) (block_<i-1>);  logits = W_out h_n + b_out (cls_head).
"""
from typing import Sequence

import flax.linen as nn
import jax

from model_zoo.models import layers


class MLP(nn.Module):
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    h_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for i, size in enumerate(self.hidden_sizes):
      h_BxD = nn.relu(layers.linear(size, f'block_{i}')(h_BxD))
      h_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxD)
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None))(h_BxD)
