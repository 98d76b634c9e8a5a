"""Variational autoencoder (Kingma & Welling, 2013, "Auto-Encoding Variational Bayes").

Generative model p(z) = N(0, I), p(x|z) from a decoder network; inference model
q(z|x) = N(mu(x), diag sigma^2(x)) from an encoder network that outputs mu and log sigma^2.
Both are trained by maximising the evidence lower bound (ELBO, the paper's eq. 3):

  log p(x) >= ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)).

Reparameterisation (section 2.4): z = mu + sigma * eps with eps ~ N(0, I), so that a
Monte-Carlo estimate of E_q[log p(x|z)] is differentiable in mu and sigma.

KL of a diagonal Gaussian from N(0, I), in closed form (appendix B), summed over the Z latents:

  KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1).

Decoders (the paper's appendix C), for pixels x in [0, 1] summed over all H*W*C of them:
  Bernoulli: p = sigmoid(logits),  -log p(x|z) = -sum [x log p + (1 - x) log(1 - p)]
             (sigmoid cross-entropy; for grey rather than binary pixels this is the usual
             cross-entropy surrogate, not a normalised density, and its minimum is above 0);
  Gaussian:  N(x; mean, std^2) with a fixed std,
             -log p(x|z) = sum [(x - mean)^2 / (2 std^2) + log std + log(2 pi) / 2].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model_zoo.models.autoencoder import Decoder, Encoder


def kl_to_standard_normal(mu_BxZ: jax.Array, log_var_BxZ: jax.Array) -> jax.Array:
  """KL(N(mu, diag exp(log_var)) || N(0, I)) per example, in nats."""
  return 0.5 * jnp.sum(mu_BxZ ** 2 + jnp.exp(log_var_BxZ) - log_var_BxZ - 1.0, axis=-1)


def bernoulli_nll(x_BxHxWxC: jax.Array, logits_BxHxWxC: jax.Array) -> jax.Array:
  """-log p(x|z) per example for Bernoulli pixels with these logits, in nats."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BxHxWxC, x_BxHxWxC), axis=(1, 2, 3))


def gaussian_nll(x_BxHxWxC: jax.Array, mean_BxHxWxC: jax.Array, std: float) -> jax.Array:
  """-log p(x|z) per example for independent Gaussian pixels N(mean, std^2), in nats."""
  per_pixel = 0.5 * ((x_BxHxWxC - mean_BxHxWxC) / std) ** 2 + jnp.log(std) + 0.5 * jnp.log(2 * jnp.pi)
  return jnp.sum(per_pixel, axis=(1, 2, 3))


def reparameterize(mu_BxZ: jax.Array, log_var_BxZ: jax.Array, eps_BxZ: jax.Array) -> jax.Array:
  """z = mu + sigma * eps, sigma = exp(log_var / 2)."""
  return mu_BxZ + jnp.exp(0.5 * log_var_BxZ) * eps_BxZ


class VAE(nn.Module):
  """MLP encoder to (mu, log sigma^2) and mirrored MLP decoder; `image_shape` (H, W, C) comes from the data.

  The decoder's output is the Bernoulli logits or the Gaussian mean: the task's `likelihood` says which.
  """
  image_shape: Sequence[int]
  latent_dim: int = 8
  hidden_sizes: Sequence[int] = (256, 128)

  def setup(self):
    self.encoder = Encoder(self.hidden_sizes, 2 * self.latent_dim)
    self.decoder = Decoder(tuple(reversed(self.hidden_sizes)), self.image_shape)

  def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> mu_BxZ, log_var_BxZ of q(z|x)."""
    mu_BxZ, log_var_BxZ = jnp.split(self.encoder(x_BxHxWxC), 2, axis=-1)
    return mu_BxZ, log_var_BxZ

  def decode(self, z_BxZ: jax.Array) -> jax.Array:
    return self.decoder(z_BxZ)

  def __call__(self, x_BxHxWxC: jax.Array, eps_BxZ: jax.Array):
    """One reparameterised sample z = mu + sigma * eps -> (decoder output, mu_BxZ, log_var_BxZ)."""
    mu_BxZ, log_var_BxZ = self.encode(x_BxHxWxC)
    return self.decode(reparameterize(mu_BxZ, log_var_BxZ, eps_BxZ)), mu_BxZ, log_var_BxZ
