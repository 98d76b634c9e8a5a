"""Optimizers and learning-rate schedules from `config.optimizer`, through optax.

The chain is: clip by global norm -> the optimizer (with decoupled weight decay
for adamw and lion, L2 added to the gradient for the others) -> schedule. Weight
decay never touches biases or normalisation scales (any parameter with ndim < 2).

Fine-tuning options: `layer_decay` < 1 scales each update by layer_decay^(depth from the top)
(layer-wise learning-rate decay, Clark et al., 2020; depths as model_zoo.models.protocol defines
them: `block_i` is layer i + 1, input layers 0, everything else, heads included, the top), and
`frozen(path)` True gives that parameter an update of exactly zero (weight decay included).
"""
from typing import Callable

import jax
import ml_collections
import optax

from model_zoo.config import lookup
from model_zoo.errors import UserError
from model_zoo.models import protocol


NAMES = ('sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop', 'adafactor', 'lion')
SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear', 'rsqrt')


def check(cfg: ml_collections.ConfigDict, num_train_steps: int, key: str = 'optimizer'):
  """A UserError, before anything is built, for an optimizer config (`config.<key>`) that cannot be."""
  def need(ok, what):
    if not ok:
      raise UserError(f'config.{key}.{what}')
  lookup(dict.fromkeys(NAMES), cfg.name, 'optimizer', f'{key}.name')
  lookup(dict.fromkeys(SCHEDULES), cfg.schedule, 'schedule', f'{key}.schedule')
  need(cfg.learning_rate > 0, f'learning_rate must be > 0, got {cfg.learning_rate}')
  need(cfg.weight_decay >= 0, f'weight_decay must be >= 0, got {cfg.weight_decay}')
  need(cfg.grad_clip_norm >= 0, f'grad_clip_norm must be >= 0, got {cfg.grad_clip_norm}')
  need(0 <= cfg.warmup_steps <= num_train_steps,
       f'warmup_steps must be in [0, num_train_steps={num_train_steps}], got {cfg.warmup_steps}')
  need(0 <= cfg.end_learning_rate_factor <= 1, f'end_learning_rate_factor must be in [0, 1], got '
       f'{cfg.end_learning_rate_factor}')
  for name in ('momentum', 'b1', 'b2'):
    need(0 <= cfg[name] < 1, f'{name} must be in [0, 1), got {cfg[name]}')
  need(0 < cfg.get('layer_decay', 1.0) <= 1, f'layer_decay must be in (0, 1], got {cfg.get("layer_decay")}')


def schedule(cfg: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  end = lr * cfg.end_learning_rate_factor

  def warmup_then(decay: optax.Schedule) -> optax.Schedule:
    if warmup == 0:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])

  decay_steps = max(num_train_steps - warmup, 1)
  schedules = {
      'constant': lambda: optax.constant_schedule(lr),
      'warmup_cosine': lambda: warmup_then(optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr)),
      'warmup_linear': lambda: warmup_then(optax.linear_schedule(lr, end, decay_steps)),
      # Vaswani et al. (2017): lr * min(step / warmup, sqrt(warmup / step)); peak lr at `warmup`.
      'rsqrt': lambda: lambda step: lr * jax.numpy.minimum(
          (step + 1) / max(warmup, 1), jax.lax.rsqrt((step + 1) / max(warmup, 1))),
  }
  return lookup(schedules, cfg.schedule, 'schedule', 'optimizer.schedule')()


def decay_mask(params):
  """True for the parameters weight decay applies to: matrices and kernels, not biases or scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def finetuning(layer_decay: float = 1.0, frozen: Callable[[tuple[str, ...]], bool] | None = None
               ) -> optax.GradientTransformation:
  """Zeroes what belongs to frozen parameters and scales the rest by layer_decay^(top - depth).

  Used twice, on the gradients (so frozen parameters neither count in the clipping norm nor fill
  Adam's moments) and on the final updates (so weight decay cannot move them either). Stateless,
  and in every chain whatever its settings, so that the optimizer state has the same structure
  with or without them: eval.py restores any run without knowing how it was trained.
  """

  def update(updates, state, params=None):
    del params
    def block_depths(path, u) -> list:
      """block_<i> is at depth i + 1; scanned blocks (model.scan_layers) carry theirs along axis 0."""
      if protocol.STACK in path:
        return list(protocol.stacked_depths(path, u.shape))
      i = protocol.block_index(path)
      return [] if i is None else [i + 1]
    depths = [d for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
              for d in block_depths(protocol.path_names(p), u)]
    if layer_decay != 1.0 and not depths:
      raise UserError('config.optimizer.layer_decay needs a model with layers named block_<i> '
                      '(model_zoo/models/protocol.py); set it to 1.0 for this one')
    num_blocks = int(max(depths, default=0))

    def scale(keys, u):
      path = protocol.path_names(keys)
      if frozen is not None and frozen(path):
        return jax.numpy.zeros_like(u)
      if layer_decay == 1.0:
        return u
      stacked = protocol.stacked_depths(path, u.shape)
      if stacked is not None:   # one factor per block, along the leading axis
        return u * (layer_decay ** (num_blocks + 1 - stacked)).reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
      return u * layer_decay ** (num_blocks + 1 - protocol.depth(path, num_blocks))
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build(cfg: ml_collections.ConfigDict, num_train_steps: int,
          frozen: Callable[[tuple[str, ...]], bool] | None = None) -> optax.GradientTransformation:
  lr = schedule(cfg, num_train_steps)
  wd = cfg.weight_decay
  optimizers = {
      'sgd': lambda: optax.sgd(lr),
      'momentum': lambda: optax.sgd(lr, momentum=cfg.momentum),
      'nesterov': lambda: optax.sgd(lr, momentum=cfg.momentum, nesterov=True),
      'adam': lambda: optax.adam(lr, b1=cfg.b1, b2=cfg.b2),
      'adamw': lambda: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask),
      'rmsprop': lambda: optax.rmsprop(lr, momentum=cfg.momentum),
      'adafactor': lambda: optax.adafactor(lr),
      'lion': lambda: optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask),
  }
  tx = lookup(optimizers, cfg.name, 'optimizer', 'optimizer.name')()
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if wd > 0 and cfg.name not in ('adamw', 'lion'):
    parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
  return optax.chain(finetuning(frozen=frozen), *parts, tx, finetuning(cfg.get('layer_decay', 1.0), frozen))
