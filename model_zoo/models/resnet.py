"""ResNet (He et al., 2015, "Deep Residual Learning for Image Recognition").

A residual block learns F(x) and outputs y = relu(F(x) + W_s x)                         (eq. 1, 2)
where W_s is the identity, or a projection (1x1 conv + BN, stride s) where the shape changes
(option B). F is two 3x3 convs ("basic": ResNet-18/34) or 1x1 -> 3x3 -> 1x1 with 4x wider
output ("bottleneck": ResNet-50/101/152), each conv followed by batch normalisation
(Ioffe & Szegedy, 2015): BN(x) = gamma (x - mu_B) / sqrt(var_B + eps) + beta, with mu_B, var_B
over the batch and spatial axes in training, and their running averages in evaluation. The
stride of a bottleneck sits on its 3x3 conv (torchvision's "v1.5"); the last BN of each block
starts at gamma = 0, so each block starts as the identity (Goyal et al., 2017).

Stems: 'imagenet' is the paper's 7x7/2 conv + 3x3/2 max-pool (224 -> 56); 'cifar' one 3x3 conv
and no pooling (for 32x32 and smaller images). Stage i has `width * 2**i` channels
(x4 after a bottleneck) and stride 2 except the first. Global average pool, then a dense layer
(`cls_head`). The residual blocks are numbered through all stages, block_0, block_1, ... (ResNet-18:
block_0 to block_7, stages starting at block_0, 2, 4, 6).
Batch statistics live in the 'batch_stats' collection; under jit over a batch sharded across
devices, mu_B and var_B are those of the global batch (synchronised BN).
"""
from functools import partial
from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.models import layers


def _conv(features: int, kernel: int, stride: int = 1, name: str | None = None):
  p = kernel // 2  # symmetric padding, as in the paper's (Torch) implementation
  return layers.conv(features, kernel, stride, padding=((p, p), (p, p)), use_bias=False, name=name)


class ResidualBlock(nn.Module):
  features: int
  stride: int
  bottleneck: bool
  norm: partial

  @nn.compact
  def __call__(self, x_BxHxWxC):
    f, s, norm = self.features, self.stride, self.norm
    if self.bottleneck:
      h = nn.relu(norm()(_conv(f, 1)(x_BxHxWxC)))
      h = nn.relu(norm()(_conv(f, 3, s)(h)))
      h = norm(scale_init=nn.initializers.zeros_init())(_conv(4 * f, 1)(h))
    else:
      h = nn.relu(norm()(_conv(f, 3, s)(x_BxHxWxC)))
      h = norm(scale_init=nn.initializers.zeros_init())(_conv(f, 3)(h))
    shortcut = x_BxHxWxC
    if shortcut.shape != h.shape:
      shortcut = norm(name='proj_bn')(_conv(h.shape[-1], 1, s, name='proj_conv')(x_BxHxWxC))
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """ResNet-18: stage_sizes (2, 2, 2, 2) basic; -34: (3, 4, 6, 3) basic; -50: (3, 4, 6, 3) bottleneck."""
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Literal['basic', 'bottleneck'] = 'basic'
  width: int = 64             # channels of the first stage (and the stem)
  stem: Literal['imagenet', 'cifar'] = 'imagenet'  # 7x7/2 conv + 3x3/2 max-pool | 3x3 conv
  bn_momentum: float = 0.9    # running average: r <- momentum * r + (1 - momentum) * batch statistic

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    norm = partial(layers.batch_norm, train=train, momentum=self.bn_momentum, epsilon=1e-5)
    if self.stem == 'imagenet':
      h = nn.relu(norm(name='stem_bn')(_conv(self.width, 7, 2, name='stem_conv')(x_BxHxWxC)))
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      h = nn.relu(norm(name='stem_bn')(_conv(self.width, 3, name='stem_conv')(x_BxHxWxC)))
    k = 0
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        h = ResidualBlock(self.width * 2 ** i, stride, self.block == 'bottleneck', norm, name=f'block_{k}')(h)
        k += 1
    h_BxC = jnp.mean(h, axis=(1, 2))
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None))(h_BxC)
