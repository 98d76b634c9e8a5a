"""Multi-layer perceptron classifier.

h_0 = flatten(x);  h_i = dropout(relu(W_i h_{i-1} + b_i));  logits = W_out h_n + b_out.
"""
from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    h_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for size in self.hidden_sizes:
      h_BxD = nn.relu(nn.Dense(size)(h_BxD))
      h_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxD)
    return nn.Dense(self.num_classes)(h_BxD)
