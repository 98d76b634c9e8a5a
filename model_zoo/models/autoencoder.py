"""A deterministic autoencoder with MLP encoder and decoder (Hinton & Salakhutdinov, 2006,
"Reducing the dimensionality of data with neural networks"; here with ReLU and plain backprop).

  z = f(x)  (encoder),   x_hat = sigmoid(g(z))  (decoder, pixels in [0, 1]),
  trained on  ||x - x_hat||^2 / (H W C)  (model_zoo.tasks.reconstruction).

`Encoder` and `Decoder` are reused by the VAE (model_zoo.models.vae). Their hidden layers are
`encoder/block_<i>` and `decoder/block_<i>`; their output layers the heads `encoder/latent_head`
and `decoder/pixel_head`.
"""
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from model_zoo.models import layers


class Encoder(nn.Module):
  """flatten(x) -> [dense -> relu] x len(hidden_sizes) -> dense to `out_size`."""
  hidden_sizes: Sequence[int]
  out_size: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for i, size in enumerate(self.hidden_sizes):
      h_BxD = nn.relu(layers.linear(size, f'block_{i}')(h_BxD))
    return layers.linear(self.out_size, 'latent_head')(h_BxD)


class Decoder(nn.Module):
  """z -> [dense -> relu] x len(hidden_sizes) -> dense to H*W*C, unflattened: pre-activations."""
  hidden_sizes: Sequence[int]
  image_shape: Sequence[int]

  @nn.compact
  def __call__(self, z_BxZ: jax.Array) -> jax.Array:
    h_BxD = z_BxZ
    for i, size in enumerate(self.hidden_sizes):
      h_BxD = nn.relu(layers.linear(size, f'block_{i}')(h_BxD))
    return layers.linear(int(np.prod(self.image_shape)), 'pixel_head')(h_BxD).reshape(-1, *self.image_shape)


class Autoencoder(nn.Module):
  """`hidden_sizes` for the encoder; the decoder mirrors them. `image_shape` (H, W, C) comes from the data."""
  image_shape: Sequence[int]
  latent_dim: int = 16
  hidden_sizes: Sequence[int] = (256, 128)

  def setup(self):
    self.encoder = Encoder(self.hidden_sizes, self.latent_dim)
    self.decoder = Decoder(tuple(reversed(self.hidden_sizes)), self.image_shape)

  def encode(self, x_BxHxWxC: jax.Array) -> jax.Array:
    return self.encoder(x_BxHxWxC)

  def decode(self, z_BxZ: jax.Array) -> jax.Array:
    return nn.sigmoid(self.decoder(z_BxZ))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics: training and evaluation compute the same
    return self.decode(self.encode(x_BxHxWxC))
