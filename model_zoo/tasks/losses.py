"""Losses and metrics, as free functions shared by every task.

Cross-entropy over classes or tokens (`token_sums`, summed so that batches, devices and eval
splits add up exactly), label smoothing (Szegedy et al., 2016), accuracy, perplexity, the
classification metrics of a confusion matrix, the VAE's ELBO terms and the GAN's losses.
Each is checked once against a float64 formula in tests/test_losses.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """-sum_c q_c log softmax(logits)_c per position, q = (1 - eps) onehot(label) + eps / C; nats."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  q = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
  return optax.softmax_cross_entropy(logits, q)


def token_sums(logits, labels, weights=None, label_smoothing: float = 0.0) -> dict:
  """Weighted sums over every position: `loss_sum` (label-smoothed cross-entropy), `nll_sum` (plain
  cross-entropy, the same without smoothing), `correct` (argmax == label) and `count` (the weights)."""
  weights = jnp.ones(labels.shape, logits.dtype) if weights is None else weights
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss = cross_entropy(logits, labels, label_smoothing) if label_smoothing else nll
  return {'loss_sum': jnp.sum(loss * weights), 'nll_sum': jnp.sum(nll * weights),
          'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights), 'count': jnp.sum(weights)}


def chunked_token_sums(features_BxTxD, logits_fn, labels_BxT, weights_BxT, chunks: int) -> dict:
  """`token_sums(logits_fn(features_BxTxD), labels_BxT, weights_BxT)` without the [B, T, V] logits: the sequence is
  cut into `chunks` pieces taken one after another, and each piece's logits are recomputed in the backward pass
  (jax.checkpoint), so at most [B, T / chunks, V] of them are alive. Chunks along T keep the batch's and the
  vocabulary's sharding as they are."""
  b, t = labels_BxT.shape
  split = lambda x: x.reshape(b, chunks, t // chunks, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def piece(x_BxCxD, labels_BxC, w_BxC):
    return token_sums(logits_fn(x_BxCxD).astype(jnp.float32), labels_BxC, w_BxC)

  def add(total, xs):
    return jax.tree.map(jnp.add, total, piece(*xs)), None
  zeros = {k: jnp.zeros((), jnp.float32) for k in ('loss_sum', 'nll_sum', 'correct', 'count')}
  return jax.lax.scan(add, zeros, (split(features_BxTxD), split(labels_BxT), split(weights_BxT.astype(jnp.float32))))[0]


def means(sums: dict, nll: bool = False) -> dict:
  """Per-position means of `token_sums` (a batch with no weight counts as one position): `loss`,
  what is minimised, `accuracy`, and with `nll` the plain cross-entropy beside a smoothed loss."""
  count = jnp.maximum(sums['count'], 1.0)
  out = {'loss': sums['loss_sum'] / count, 'accuracy': sums['correct'] / count}
  return {**out, 'nll': sums['nll_sum'] / count} if nll else out


def perplexity(nll: float) -> float:
  """exp(nats per token), clamped so that a diverged model reports a large number, not an overflow."""
  return math.exp(min(nll, 700.0))


def confusion(logits, labels, weights, num_classes: int):
  """[true, predicted] counts, weighted (padding has weight 0)."""
  true_onehot = jax.nn.one_hot(labels, num_classes) * weights[..., None]
  pred_onehot = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
  return jnp.einsum('...t,...p->tp', true_onehot, pred_onehot)


def classification_metrics(confusion_LxL) -> dict[str, float]:
  """Accuracy and macro precision/recall/F1 from a confusion matrix (rows: true, columns: predicted).

  As scikit-learn's `precision_recall_fscore_support(average='macro', zero_division=0)`: the
  average runs over the classes that occur in the labels or the predictions; a class that is
  never predicted has precision 0, one that never occurs has recall 0.
  """
  c = np.asarray(confusion_LxL, np.float64)
  tp = np.diag(c)
  predicted, actual = c.sum(0), c.sum(1)
  present = (predicted + actual) > 0
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)[present]
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)[present]
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
  return {'accuracy': float(tp.sum() / max(c.sum(), 1)), 'precision_macro': float(precision.mean()),
          'recall_macro': float(recall.mean()), 'f1_macro': float(f1.mean())}


# The VAE's ELBO (Kingma & Welling, 2013; equations in model_zoo.models.vae), per example in nats.

def kl_to_standard_normal(mu_BxZ: jax.Array, log_var_BxZ: jax.Array) -> jax.Array:
  """KL(N(mu, diag exp(log_var)) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)."""
  return 0.5 * jnp.sum(mu_BxZ ** 2 + jnp.exp(log_var_BxZ) - log_var_BxZ - 1.0, axis=-1)


def bernoulli_nll(x_BxHxWxC: jax.Array, logits_BxHxWxC: jax.Array) -> jax.Array:
  """-log p(x|z) for Bernoulli pixels with these logits: the sigmoid cross-entropy summed over pixels."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BxHxWxC, x_BxHxWxC), axis=(1, 2, 3))


def gaussian_nll(x_BxHxWxC: jax.Array, mean_BxHxWxC: jax.Array, std: float) -> jax.Array:
  """-log p(x|z) for independent Gaussian pixels N(mean, std^2), summed over pixels."""
  per_pixel = 0.5 * ((x_BxHxWxC - mean_BxHxWxC) / std) ** 2 + jnp.log(std) + 0.5 * jnp.log(2 * jnp.pi)
  return jnp.sum(per_pixel, axis=(1, 2, 3))


# The GAN's losses (Goodfellow et al., 2014; the non-saturating generator loss), from D's logits.

def discriminator_loss(real_logits_B, fake_logits_B):
  """-log D(x) - log(1 - D(G(z))), averaged over each batch; D = sigmoid(logit), softplus(-l) = -log sigmoid(l)."""
  return jnp.mean(jax.nn.softplus(-real_logits_B)) + jnp.mean(jax.nn.softplus(fake_logits_B))


def generator_loss(fake_logits_B):
  """-log D(G(z)), averaged over the batch."""
  return jnp.mean(jax.nn.softplus(-fake_logits_B))


# Knowledge distillation (Hinton et al., 2015): a student's outputs against a teacher's, per position.

DISTANCES = ('kl', 'hard', 'mse')


def distillation(student_logits, teacher_logits, temperature: float, distance: str):
  """Per position (in float32):
    kl    T^2 KL(softmax(t / T) || softmax(s / T)), the T^2 keeping the gradients' scale as T changes;
    hard  cross-entropy against the teacher's top-1 output (pseudo-labels);
    mse   the mean over the outputs of (s - t)^2 (logit matching, Ba & Caruana, 2014).
  The teacher's logits are under stop_gradient."""
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  if distance == 'kl':
    return temperature ** 2 * optax.losses.kl_divergence(jax.nn.log_softmax(s / temperature),
                                                         jax.nn.softmax(t / temperature))
  if distance == 'hard':
    return optax.softmax_cross_entropy_with_integer_labels(s, jnp.argmax(t, -1))
  if distance == 'mse':
    return jnp.mean((s - t) ** 2, axis=-1)
  raise ValueError(f'unknown distillation distance {distance!r}; known: {", ".join(DISTANCES)}')
