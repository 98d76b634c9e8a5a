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
These terms are free functions of model_zoo.tasks.losses; the task forms the ELBO from them.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.models.autoencoder import Decoder, Encoder


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

  def __call__(self, x_BxHxWxC: jax.Array, eps_BxZ: jax.Array, *, train: bool = False):
    """One reparameterised sample z = mu + sigma * eps -> (decoder output, mu_BxZ, log_var_BxZ)."""
    del train  # no dropout, no batch statistics
    mu_BxZ, log_var_BxZ = self.encode(x_BxHxWxC)
    return self.decode(reparameterize(mu_BxZ, log_var_BxZ, eps_BxZ)), mu_BxZ, log_var_BxZ
