"""Magnitude pruning as an optax wrapper, on the design of jaxpruner (Lee et al., 2024).

  python train.py --config=configs/mlp.py --workdir=runs/lenet_pruned --config.pruning.method=magnitude \
      --config.pruning.sparsity=0.92 --config.pruning.begin_step=200 --config.pruning.end_step=1500

`config.pruning`: `method` none | magnitude (each tensor keeps its own largest weights) |
global_magnitude (one threshold over all pruned tensors); `sparsity`, the final fraction of zeros;
`begin_step`, `end_step` and `frequency`, the schedule; `params`, a regex on parameter paths ('/'-joined)
that says which are pruned: by default the kernels of dense and conv layers and the recurrent matrices
`u` of LSTM/GRU, never embeddings, norms, biases or LoRA adapters.

The wrapper's state holds the inner optimizer's state, one boolean mask per pruned tensor (a dict shaped
like the pruned part of the parameters, so it is sharded, checkpointed and resumed with them) and the
step. Each update:
  1. masks the gradients (a pruned weight fills no moment);
  2. runs the inner optimizer;
  3. at a pruning step t, under `lax.cond`, recomputes the masks from |w| of the updated weights at the
     sparsity s_t of the schedule (weights pruned before rank first, so a mask only ever loses entries);
  4. returns the update that lands exactly on the masked weights: a pruned weight is 0.0 after every
     step, whatever momentum or weight decay would do.

The gradual schedule of Zhu & Gupta (2017), with s_i = 0, t0 = begin_step, t0 + n*dt = end_step:
  s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,
masks recomputed at t0, t0 + dt, ... and at end_step; begin_step == end_step prunes once, at that step
(0: the initial, or `init_from`'s pretrained, weights: prune-then-fine-tune). Step t is the state after t
updates.
"""
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from model_zoo.config import lookup
from model_zoo.errors import UserError
from model_zoo.models.protocol import is_lora

METHODS = ('none', 'magnitude', 'global_magnitude')


def enabled(config: ml_collections.ConfigDict) -> bool:
  return config.pruning.method != 'none'


def check(config: ml_collections.ConfigDict):
  """A UserError for a `config.pruning` that cannot be, from the config alone."""
  p = config.pruning
  lookup(dict.fromkeys(METHODS), p.method, 'pruning method', 'pruning.method')
  if not enabled(config):
    return
  if config.task == 'gan':
    raise UserError('config.pruning prunes the one model of a task; the gan task trains two: set '
                    'config.pruning.method=none')
  if not isinstance(p.sparsity, (int, float)) or not 0 <= p.sparsity < 1:
    raise UserError(f'config.pruning.sparsity is the fraction of weights set to zero, in [0, 1); got {p.sparsity!r}')
  for key in ('begin_step', 'end_step', 'frequency'):
    if not isinstance(p[key], int) or p[key] < (1 if key == 'frequency' else 0):
      raise UserError(f'config.pruning.{key} must be an integer >= {1 if key == "frequency" else 0}, got {p[key]!r}')
  if p.begin_step > p.end_step:
    raise UserError(f'config.pruning.begin_step={p.begin_step} is after end_step={p.end_step}; the schedule '
                    f'prunes from begin_step to end_step (equal: once)')
  if p.end_step > config.num_train_steps:
    raise UserError(f'config.pruning.end_step={p.end_step} is after the end of training (num_train_steps='
                    f'{config.num_train_steps}): the run would stop before reaching sparsity {p.sparsity}; '
                    f'end the schedule by step {config.num_train_steps}')
  try:
    re.compile(p.params)
  except re.error as e:
    raise UserError(f'config.pruning.params={p.params!r} is not a regular expression: {e}') from e


def sparsity_at(step, p: ml_collections.ConfigDict):
  """The target sparsity after `step` updates (a jax scalar; 0 before begin_step)."""
  step = jnp.asarray(step, jnp.float32)
  if p.end_step == p.begin_step:
    return jnp.where(step >= p.begin_step, p.sparsity, 0.0)
  progress = jnp.clip((step - p.begin_step) / (p.end_step - p.begin_step), 0.0, 1.0)
  return jnp.where(step >= p.begin_step, p.sparsity * (1 - (1 - progress) ** 3), 0.0)


def is_pruning_step(step, p: ml_collections.ConfigDict):
  return ((step >= p.begin_step) & (step <= p.end_step)
          & (((step - p.begin_step) % p.frequency == 0) | (step == p.end_step)))


def pruned_paths(params, pattern: str) -> list[tuple[str, ...]]:
  """The paths of the parameters `pattern` (config.pruning.params) selects; LoRA adapters never."""
  regex = re.compile(pattern)
  return [k for k in traverse_util.flatten_dict(params)
          if regex.fullmatch('/'.join(k)) and not is_lora(k)]


def _masks(weights: dict, old: dict, sparsity, method: str) -> dict:
  """{path: mask} keeping all but round(sparsity * n) weights by |w|, per tensor or over all of them
  (global); weights already pruned (old mask False) rank below every other, ties by position."""
  scores = {k: jnp.where(old[k], jnp.abs(w).astype(jnp.float32), -1.0).reshape(-1) for k, w in weights.items()}

  def keep(score):
    n = score.size
    order = jnp.argsort(score, stable=True)
    pruned = jnp.round(sparsity * n).astype(jnp.int32)
    return jnp.zeros(n, bool).at[order].set(jnp.arange(n) >= pruned)
  if method == 'magnitude':
    return {k: keep(s).reshape(weights[k].shape) for k, s in scores.items()}
  kept = keep(jnp.concatenate(list(scores.values())))
  out, start = {}, 0
  for k, w in weights.items():
    out[k] = kept[start:start + w.size].reshape(w.shape)
    start += w.size
  return out


class PruningState(NamedTuple):
  inner: optax.OptState
  masks: dict        # the pruned parameters' paths, as nested dicts -> bool arrays
  step: jax.Array    # updates so far


def prune(tx: optax.GradientTransformation, p: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`tx` with magnitude pruning as `p` (config.pruning) says; see the module doc."""

  def split(params):
    flat = traverse_util.flatten_dict(params)
    return flat, {k: flat[k] for k in pruned_paths(params, p.params)}

  def init(params):
    _, weights = split(params)
    if not weights:
      raise UserError(f'config.pruning.params={p.params!r} matches no parameter of this model; the parameter '
                      f'paths look like {"/".join(next(iter(traverse_util.flatten_dict(params))))!r}')
    masks = {k: jnp.ones(w.shape, bool) for k, w in weights.items()}
    if p.begin_step == 0:
      masks = _masks(weights, masks, sparsity_at(0, p), p.method)
    return PruningState(tx.init(params), traverse_util.unflatten_dict(masks), jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('pruning needs the parameters in update()')
    masks = traverse_util.flatten_dict(state.masks)
    grads = traverse_util.unflatten_dict({k: g * masks[k] if k in masks else g
                                          for k, g in traverse_util.flatten_dict(grads).items()})
    updates, inner = tx.update(grads, state.inner, params)
    step = state.step + 1
    flat_params = traverse_util.flatten_dict(params)
    new = traverse_util.flatten_dict(optax.apply_updates(params, updates))
    masks = jax.lax.cond(is_pruning_step(step, p),
                         lambda: _masks({k: new[k] for k in masks}, masks, sparsity_at(step, p), p.method),
                         lambda: masks)
    flat_updates = traverse_util.flatten_dict(updates)
    for k, m in masks.items():   # lands on new * m: p + (0 - p) is exactly 0
      flat_updates[k] = jnp.where(m, new[k], 0).astype(new[k].dtype) - flat_params[k]
    return (traverse_util.unflatten_dict(flat_updates),
            PruningState(inner, traverse_util.unflatten_dict(masks), step))

  return optax.GradientTransformation(init, update)


def mask_sparsity(opt_state) -> jax.Array:
  """The fraction of pruned weights that the masks of a PruningState set to zero."""
  leaves = jax.tree.leaves(opt_state.masks)
  return sum(jnp.sum(~m) for m in leaves) / sum(m.size for m in leaves)   # counted pruned: 0 is exactly 0.0


def measured_sparsity(params, pattern: str) -> tuple[float, dict[str, float]]:
  """(fraction of exact zeros over the parameters `pattern` selects, {path: its fraction}), on the host."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  by_layer, zeros, total = {}, 0, 0
  for k in pruned_paths(params, pattern):
    w = np.asarray(flat[k])
    z = int(np.sum(w == 0))
    by_layer['/'.join(k)] = z / w.size
    zeros, total = zeros + z, total + w.size
  return zeros / max(total, 1), by_layer


# Storage as Han et al. (2016) count it: the non-zero values and where they are (here one bit per weight).

def to_sparse(flat: dict[str, np.ndarray], paths) -> tuple[dict[str, np.ndarray], dict]:
  """{path: array} with each of `paths` stored as `<path>/values` (its non-zeros, row-major) and
  `<path>/bitmask` (np.packbits of w != 0) -> (those arrays, {'dense_bytes', 'sparse_bytes'})."""
  out, dense, sparse = {}, 0, 0
  for k, w in flat.items():
    dense += w.nbytes
    if k in paths:
      nonzero = w.reshape(-1) != 0
      out[f'{k}/values'] = np.ascontiguousarray(w.reshape(-1)[nonzero])
      out[f'{k}/bitmask'] = np.packbits(nonzero)
      sparse += out[f'{k}/values'].nbytes + out[f'{k}/bitmask'].nbytes
    else:
      out[k] = w
      sparse += w.nbytes
  return out, {'dense_bytes': dense, 'sparse_bytes': sparse}


def from_sparse(stored: dict[str, np.ndarray], shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """The dense {path: array} of `to_sparse`'s output; `shapes` gives each sparse tensor's shape."""
  out = {k: v for k, v in stored.items() if not k.endswith(('/values', '/bitmask'))}
  for k, shape in shapes.items():
    values, bits = stored[f'{k}/values'], stored[f'{k}/bitmask']
    nonzero = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool)
    dense = np.zeros(nonzero.size, values.dtype)
    dense[nonzero] = values
    out[k] = dense.reshape(shape)
  return out
