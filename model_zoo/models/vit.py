"""Vision Transformer (Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words").

The image is cut into N = HW / P^2 patches x_p^i of P x P x C pixels, each linearly embedded
(a conv with stride P is the same map), with a learned class token and position embeddings:
  z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos                                          (eq. 1)
  z'_l = MSA(LN(z_{l-1})) + z_{l-1},   z_l = MLP(LN(z'_l)) + z'_l,   l = 1..L             (eq. 2, 3)
  y = LN(z_L^0)                                                                            (eq. 4)
then a linear head on y (`cls_head`). pool='mean' drops the class token and uses the mean of LN(z_L)
over the patches instead (the paper's "global average pooling" variant). The encoder blocks are the
shared pre-LN GELU blocks of model_zoo.models.layers (their attention projections have no biases).
Shape letters: P patches (+ 1 with the class token), P_h x P_w their grid.
"""
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.errors import UserError
from model_zoo.models import layers


class ViT(nn.Module):
  num_classes: int
  patch_size: int = 16
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  d_ff: int = 3072
  pool: Literal['cls', 'mean'] = 'cls'  # the class token's output | the mean over the patch outputs
  dropout_rate: float = 0.0
  scan_layers: bool = False          # one nn.scan over the blocks (parameters stacked on a 'layers' axis)
  remat_policy: layers.RematPolicy = 'none'   # what the backward pass recomputes (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    p, d = self.patch_size, self.d_model
    b, height, width, _ = x_BxHxWxC.shape
    if height % p or width % p:
      raise UserError(f'ViT needs a config.model.patch_size={p} that divides the {height}x{width} images')
    logical = nn.with_logical_partitioning
    x_BxPhxPwxD = layers.conv(d, p, p, 'VALID', name='patch_embed')(x_BxHxWxC)
    x_BxPxD = x_BxPhxPwxD.reshape(b, -1, d)
    if self.pool == 'cls':
      cls_1x1xD = self.param('cls_embedding', logical(nn.initializers.zeros_init(), (None, None, 'embed')), (1, 1, d))
      x_BxPxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD, (b, 1, d)), x_BxPxD], axis=1)
    pos_1xPxD = self.param('pos_embedding', logical(nn.initializers.normal(0.02), (None, 'length', 'embed')),
                           (1, x_BxPxD.shape[1], d))
    x_BxPxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxPxD + pos_1xPxD)
    block = layers.BlockConfig(self.num_heads, d // self.num_heads, self.d_ff, pre_ln=True, activation='gelu',
                               dropout_rate=self.dropout_rate)
    x_BxPxD = layers.blocks(block, self.num_layers, x_BxPxD, train, scan=self.scan_layers,
                            remat_policy=self.remat_policy)
    x_BxPxD = layers.layer_norm(jnp.float32, 'final_norm')(x_BxPxD)
    y_BxD = x_BxPxD[:, 0] if self.pool == 'cls' else jnp.mean(x_BxPxD, axis=1)
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None))(y_BxD)
