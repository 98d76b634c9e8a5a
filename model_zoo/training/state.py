"""The train state: everything a step reads and writes, as one pytree."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """`params` may hold `nn.LogicallyPartitioned` boxes until the loop unboxes the state.

  `model_state` holds non-trained collections such as `batch_stats` ({} if none).
  """
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  model_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params, tx, model_state=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(nn.unbox(params)),
               model_state=model_state or {}, tx=tx)

  def apply_gradients(self, grads, model_state=None):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state,
                        model_state=self.model_state if model_state is None else model_state)
