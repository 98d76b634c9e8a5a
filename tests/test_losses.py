"""The shared losses and metrics (model_zoo/tasks/losses.py) against their formulas in float64.

The VAE's terms are checked in test_autoencoder_vae.py (the KL by Monte Carlo, the likelihoods with
scipy), the GAN's losses in test_gan.py and the classification metrics against scikit-learn in
test_metrics.py."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.tasks import losses


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _batch(seed=0, shape=(3, 5), classes=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, shape + (classes,)).astype(np.float32)
  labels = rng.integers(0, classes, shape).astype(np.int32)
  weights = (rng.random(shape) > 0.3).astype(np.float32)
  return logits, labels, weights


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_weighted_cross_entropy_with_label_smoothing(smoothing):
  logits, labels, weights = _batch()
  c = logits.shape[-1]
  logp = _log_softmax(logits)
  target = np.full(logp.shape, smoothing / c)   # (1 - eps) onehot + eps / C
  np.put_along_axis(target, labels[..., None], 1 - smoothing + smoothing / c, -1)
  smoothed = -(target * logp).sum(-1)
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), labels, smoothing), smoothed, rtol=1e-5)
  sums = losses.token_sums(jnp.asarray(logits), labels, weights, smoothing)
  assert float(sums['loss_sum']) == pytest.approx((smoothed * weights).sum(), rel=1e-5)
  assert float(sums['nll_sum']) == pytest.approx((nll * weights).sum(), rel=1e-5)
  assert float(sums['correct']) == ((logits.argmax(-1) == labels) * weights).sum()
  assert float(sums['count']) == weights.sum()
  means = losses.means(sums, nll=True)
  assert float(means['loss']) == pytest.approx((smoothed * weights).sum() / weights.sum(), rel=1e-5)
  assert float(means['nll']) == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-5)
  assert float(means['accuracy']) == pytest.approx(((logits.argmax(-1) == labels) * weights).sum() / weights.sum())
  if smoothing:   # smoothing raises the loss above the plain cross-entropy of a confident model
    assert float(sums['loss_sum']) != pytest.approx(float(sums['nll_sum']), rel=1e-3)


def test_unweighted_sums_and_an_empty_batch():
  logits, labels, _ = _batch(1)
  sums = losses.token_sums(jnp.asarray(logits), labels)
  assert float(sums['count']) == labels.size
  empty = losses.means(losses.token_sums(jnp.asarray(logits), labels, np.zeros(labels.shape, np.float32)))
  assert float(empty['loss']) == 0.0 and float(empty['accuracy']) == 0.0   # no weight: 0, not NaN


def test_perplexity_and_its_clamp():
  assert losses.perplexity(math.log(251.7)) == pytest.approx(251.7)
  assert losses.perplexity(0.0) == 1.0
  assert math.isfinite(losses.perplexity(1e4))   # a diverged model: large, not an overflow


def test_confusion_counts_weighted_pairs():
  logits, labels, weights = _batch(2, shape=(4, 6), classes=5)
  want = np.zeros((5, 5))
  for t, p, w in zip(labels.ravel(), logits.argmax(-1).ravel(), weights.ravel()):
    want[t, p] += w
  np.testing.assert_array_equal(losses.confusion(jnp.asarray(logits), labels, weights, 5), want)
