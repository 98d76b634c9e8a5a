"""MLP-Mixer (Tolstikhin et al., 2021, "MLP-Mixer: An all-MLP Architecture for Vision").

The image is cut into P = HW / p^2 patches, each linearly embedded (a conv with stride p): the
table X in R^{P x D}. Each Mixer layer (block_<i>) mixes along patches, then along channels:

  U_{*,i} = X_{*,i} + W_2 GELU(W_1 LayerNorm(X)_{*,i}),   i = 1..D      token mixing   (eq. 1)
  Y_{j,*} = U_{j,*} + W_4 GELU(W_3 LayerNorm(U)_{j,*}),   j = 1..P      channel mixing

W_1 in R^{D_S x P} and W_2 in R^{P x D_S} are shared by all channels; W_3 in R^{D_C x D} and
W_4 in R^{D x D_C} by all patches (each with a bias). After the last layer: LayerNorm, the mean over
patches (global average pooling) and a linear layer to the classes (`cls_head`, zero-initialised as
in the paper's code). There is no position embedding: token mixing sees where each patch is.
Shape letters: P patches, D channels (the paper's C), F the hidden width of either MLP.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.errors import UserError
from model_zoo.models import layers


class MlpBlock(nn.Module):
  """x W_in -> GELU -> W_out, over the last axis, whose logical name is `axis`."""
  hidden: int
  axis: str

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(layers.linear(self.hidden, 'wi', axes=(self.axis, 'mlp'))(x))
    return layers.linear(x.shape[-1], 'wo', axes=('mlp', self.axis))(h)


class MixerBlock(nn.Module):
  """Token mixing (an MLP across patches, per channel), then channel mixing (per patch); pre-LN."""
  token_mlp_dim: int
  channel_mlp_dim: int

  @nn.compact
  def __call__(self, x_BxPxD):
    y_BxDxP = jnp.swapaxes(layers.layer_norm(jnp.float32, 'token_norm')(x_BxPxD), 1, 2)
    x_BxPxD = x_BxPxD + jnp.swapaxes(MlpBlock(self.token_mlp_dim, 'length', name='token_mixing')(y_BxDxP), 1, 2)
    y_BxPxD = layers.layer_norm(jnp.float32, 'channel_norm')(x_BxPxD)
    return x_BxPxD + MlpBlock(self.channel_mlp_dim, 'embed', name='channel_mixing')(y_BxPxD)


class Mixer(nn.Module):
  num_classes: int
  patch_size: int = 16
  d_model: int = 512             # the paper's hidden size C
  num_layers: int = 8
  token_mlp_dim: int = 256       # D_S
  channel_mlp_dim: int = 2048    # D_C

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    del train  # no dropout, no batch statistics
    p, d = self.patch_size, self.d_model
    b, height, width, _ = x_BxHxWxC.shape
    if height % p or width % p:
      raise UserError(f'Mixer needs a patch_size={p} that divides the {height}x{width} images; '
                      f'set config.model.patch_size')
    x_BxPxD = layers.conv(d, p, p, 'VALID', name='patch_embed')(x_BxHxWxC).reshape(b, -1, d)
    for i in range(self.num_layers):
      x_BxPxD = MixerBlock(self.token_mlp_dim, self.channel_mlp_dim, name=f'block_{i}')(x_BxPxD)
    y_BxD = jnp.mean(layers.layer_norm(jnp.float32, 'final_norm')(x_BxPxD), axis=1)
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None),
                         kernel_init=nn.initializers.zeros_init())(y_BxD)
