"""Attributions: how much each unit of an input (a pixel, a token) moved a model's score of one class.

Every method takes `score(x) -> [B]`, the target class's logit (or log-probability) of a batch of
inputs x [B, *U, *F] (U the unit axes: H, W of an image, T of a token row; F the features summed
into a unit: channels, or the embedding), and a baseline x' of x's shape, "the input with nothing
in it" (a black image, [MASK] tokens). With g(x) = d score / dx:

  gradient x input      g(x) (x - x')                     (Shrikumar et al., 2016; x' = 0: the usual g(x) x)
  integrated gradients  (x - x') 1/m sum_k g(x' + (k - 1/2)/m (x - x')),  k = 1..m
                        Sundararajan et al. (2017), eq. 3 with the midpoint rule: the attributions sum to
                        score(x) - score(x') (completeness, their Proposition 1) up to O(1/m^2)
  SmoothGrad            (x - x') 1/n sum_i g(x + eps_i),  eps_i ~ N(0, (noise (max x - min x))^2)
                        (Smilkov et al., 2017, eq. 3; here of gradient x input, as their section 4 allows)
  occlusion             score(x) - score(x with a window of units set to x'), averaged over the windows
                        that cover a unit (Zeiler & Fergus, 2014)

Units outside `valid` (padding, [CLS], [SEP]) are never changed and get 0. Path points, noise samples
and windows are evaluated `chunk` at a time (`jax.lax.map`), so memory is that of `chunk` batches.

Faithfulness (`deletion_curve`; Petsiuk et al., 2018, "RISE", the deletion metric): the units are set to
the baseline in the order of their attributions, and the probability of the class is read after each
fraction; a faithful attribution makes it fall fast, so the area under the curve is small. A random
order is the reference.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('integrated_gradients', 'smoothgrad', 'gradient_x_input', 'occlusion')


def _grad(score):
  # Each example's score depends on its own input only (evaluation mode), so the gradient of the sum is
  # every example's own gradient.
  return jax.grad(lambda x: jnp.sum(score(x)))


def _expand(u_BxU, x):
  """A [B, *U] array broadcast against x [B, *U, *F]."""
  return u_BxU.reshape(u_BxU.shape + (1,) * (x.ndim - u_BxU.ndim))


def gradient_x_input(score, x, baseline):
  return _grad(score)(x) * (x - baseline)


def integrated_gradients(score, x, baseline, *, steps: int, chunk: int = 16):
  alphas_M = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  grads_MxB = jax.lax.map(lambda a: _grad(score)(baseline + a * (x - baseline)), alphas_M,
                          batch_size=min(chunk, steps))
  return (x - baseline) * jnp.mean(grads_MxB, axis=0)


def smoothgrad(score, x, baseline, *, key, samples: int, noise: float, chunk: int = 16):
  axes = tuple(range(1, x.ndim))
  sigma = noise * (jnp.max(x, axes, keepdims=True) - jnp.min(x, axes, keepdims=True))
  keys = jax.random.split(key, samples)
  grads = jax.lax.map(lambda k: _grad(score)(x + sigma * jax.random.normal(k, x.shape, x.dtype)), keys,
                      batch_size=min(chunk, samples))
  return (x - baseline) * jnp.mean(grads, axis=0)


def windows(unit_shape: tuple[int, ...], size: int) -> np.ndarray:
  """The occlusion windows [M, *U]: a `size`-wide square (a run of `size` tokens) at every unit, cut at the edges."""
  grids = np.meshgrid(*[np.arange(n) for n in unit_shape], indexing='ij')
  starts = np.stack([g.ravel() for g in grids], 1)                       # [M, ndim]
  masks = np.ones((len(starts),) + tuple(unit_shape), bool)
  for axis, n in enumerate(unit_shape):
    pos = np.arange(n).reshape([1 if i != axis else n for i in range(len(unit_shape))])
    lo = starts[:, axis].reshape((-1,) + (1,) * len(unit_shape))
    masks &= (pos >= lo) & (pos < lo + size)
  return masks


def occlusion(score, x, baseline, valid_BxU, *, size: int, chunk: int = 16):
  """-> [B, *U]: unit attributions directly (occlusion has none per feature)."""
  masks_MxU = jnp.asarray(windows(valid_BxU.shape[1:], size))
  full_B = score(x)

  def drop(mask_U):
    mask_BxU = mask_U[None] & valid_BxU
    return full_B - score(jnp.where(_expand(mask_BxU, x), baseline, x)), mask_BxU
  diffs_MxB, masks_MxBxU = jax.lax.map(drop, masks_MxU, batch_size=min(chunk, len(masks_MxU)))
  spread = jnp.einsum('mb,mb...->b...', diffs_MxB, masks_MxBxU.astype(jnp.float32))
  covered = jnp.sum(masks_MxBxU, axis=0)
  return jnp.where(valid_BxU, spread / jnp.maximum(covered, 1), 0.0)


def attribute(method: str, score, x, baseline, valid_BxU, *, steps: int, samples: int, noise: float,
              window: int, key, chunk: int = 16):
  """-> [B, *U], the attribution of each unit (its features summed), 0 outside `valid`."""
  if method == 'occlusion':
    return occlusion(score, x, baseline, valid_BxU, size=window, chunk=chunk)
  if method == 'integrated_gradients':
    a = integrated_gradients(score, x, baseline, steps=steps, chunk=chunk)
  elif method == 'smoothgrad':
    a = smoothgrad(score, x, baseline, key=key, samples=samples, noise=noise, chunk=chunk)
  elif method == 'gradient_x_input':
    a = gradient_x_input(score, x, baseline)
  else:
    raise ValueError(f'unknown attribution method {method!r}; known: {", ".join(METHODS)}')
  a = jnp.sum(a, axis=tuple(range(valid_BxU.ndim, x.ndim)))
  return jnp.where(valid_BxU, a, 0.0)


def completeness_error(attributions_BxU, score_x_B, score_baseline_B):
  """|sum of attributions - (score(x) - score(x'))| / |score(x) - score(x')| of each example."""
  delta_B = score_x_B - score_baseline_B
  total_B = jnp.sum(attributions_BxU.reshape(attributions_BxU.shape[0], -1), axis=1)
  return jnp.abs(total_B - delta_B) / jnp.maximum(jnp.abs(delta_B), 1e-12)


def deletion_order(attributions_BxU, valid_BxU):
  """The rank of each unit (0 = deleted first) in decreasing attribution; invalid units last."""
  flat = jnp.where(valid_BxU, attributions_BxU, -jnp.inf).reshape(attributions_BxU.shape[0], -1)
  order = jnp.argsort(-flat, axis=1, stable=True)
  return jnp.argsort(order, axis=1).reshape(attributions_BxU.shape)


def delete(x, baseline, rank_BxU, count_B):
  """x with the `count` first-ranked units of each example set to the baseline."""
  return jnp.where(_expand(rank_BxU < count_B.reshape((-1,) + (1,) * (rank_BxU.ndim - 1)), x), baseline, x)


def deletion_curve(probability: Callable, x, baseline, attributions_BxU, valid_BxU, *, points: int,
                   chunk: int = 16):
  """-> [B, points + 1]: the class probability after deleting fractions 0, 1/points, ..., 1 of the valid units."""
  rank_BxU = deletion_order(attributions_BxU, valid_BxU)
  n_B = jnp.sum(valid_BxU.reshape(valid_BxU.shape[0], -1), axis=1)
  fractions_P = jnp.linspace(0.0, 1.0, points + 1)

  def after(q):
    return probability(delete(x, baseline, rank_BxU, jnp.round(q * n_B).astype(jnp.int32)))
  return jax.lax.map(after, fractions_P, batch_size=min(chunk, points + 1)).T


def area(curve_BxP):
  """The area under each curve over fractions in [0, 1] (the trapezoid rule)."""
  return jnp.trapezoid(curve_BxP, dx=1.0 / (curve_BxP.shape[1] - 1), axis=1)
