"""The device mesh, and shardings from logical axis names.

Modules name their parameter axes (`nn.with_logical_partitioning`, in every family: see
model_zoo.models.protocol); RULES maps those names onto mesh axes. Data parallel, FSDP and tensor
parallel differ only in the mesh shape (`config.mesh`): the code path is the same. A dimension
that does not divide over the mesh axes its name maps to stays whole (replicated over them).
"""
import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model_zoo.errors import UserError
from model_zoo.models import layers
from model_zoo.training.state import TrainState

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')  # the mesh axes a batch is split over
# Parameters' logical axes, then activations' (the models' layers.constrain, at block boundaries, q/k/v, the MLP's
# hidden layer and the logits): activations stay split over the batch axes, so that FSDP gathers weights, not
# activations, and tensor parallelism splits heads, the MLP and the vocabulary.
RULES = (
    ('batch', BATCH),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('length', None),
    ('layers', None),     # the stacked blocks of a scanned model (model.scan_layers)
    ('activation_batch', BATCH),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def constrained(fn, mesh: Mesh):
  """`fn`, traced with the models' activation constraints (model_zoo.models.layers.constrain) resolved onto
  `mesh` by RULES; outside it (sampling, export, the tests' direct model calls) they are no-ops."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with layers.activation_sharding(mesh, RULES):
      return fn(*args, **kwargs)
  return traced


def check_divisible(model_config: ml_collections.ConfigDict, vocab_size: int | None, mesh: Mesh):
  """A UserError, before anything compiles, for a tensor-parallel mesh that the model's heads, MLP or vocabulary
  do not divide over (they would be silently replicated, or fail to compile)."""
  tensor = mesh.shape['tensor']
  if tensor == 1:
    return
  heads = model_config.get('num_heads')
  sizes = {'model.num_heads': heads, 'model.num_kv_heads': model_config.get('num_kv_heads') or None,
           'model.d_ff': model_config.get('d_ff'), 'dataset.vocab_size': vocab_size if heads else None}
  for key, size in sizes.items():
    if size and size % tensor:
      raise UserError(f'config.{key}={size} does not divide over config.mesh.tensor={tensor} devices; use a '
                      f'tensor size that divides it (or shard with mesh.fsdp instead)')


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = [mesh_config[a] for a in AXES]
  known = int(np.prod([s for s in shape if s != -1]))
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f'config.mesh must hold positive sizes and at most one -1, got {dict(zip(AXES, shape))}')
  if -1 in shape:
    if len(devices) % known:
      raise UserError(f'config.mesh {dict(zip(AXES, shape))} does not divide {len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise UserError(f'config.mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices; '
                    f'there are {len(devices)}')
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def accumulation_steps(batch_size: int, per_device_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> int:
  """The micro-batches a step that make the global `batch_size` out of `per_device_batch_size` rows on each
  data-parallel device (config.per_device_batch_size); `grad_accum_steps` as it is where that is 0."""
  if not per_device_batch_size:
    return grad_accum_steps
  n = mesh.shape['data'] * mesh.shape['fsdp']
  micro = per_device_batch_size * n
  if batch_size % micro:
    raise UserError(f'config.batch_size={batch_size} is not a whole number of micro-batches of '
                    f'config.per_device_batch_size={per_device_batch_size} rows on each of {n} data-parallel '
                    f'devices ({micro} rows); use a batch_size that is a multiple of {micro}')
  if grad_accum_steps not in (1, batch_size // micro):
    raise UserError(f'config.grad_accum_steps={grad_accum_steps} and config.per_device_batch_size='
                    f'{per_device_batch_size} disagree ({n} data-parallel devices make that '
                    f'{batch_size // micro} micro-batches a step); set only one of them')
  return batch_size // micro


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh):
  """The global batch (and each micro-batch) must split evenly over data-parallel devices."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  micro = batch_size // grad_accum_steps
  if micro % n or batch_size % jax.process_count():
    raise UserError(
        f'config.batch_size={batch_size} (micro-batch {micro} with grad_accum_steps={grad_accum_steps}) '
        f'does not divide over {n} data-parallel devices in {jax.process_count()} process(es); '
        f'use a multiple of {n * grad_accum_steps}')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def to_global(local_batch, mesh: Mesh):
  """This process's numpy batch -> global jax.Arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


class BatchRows:
  """Inference batches that every process holds whole (prompts, sources: the same command line on every host)
  moved onto the mesh split over the batch axes, each process giving only its own rows, so that each decodes
  its share; outputs come back whole to every process. Batches must hold a multiple of `multiple` rows."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.multiple = int(np.prod([mesh.shape[a] for a in BATCH]))

  def put(self, x_Bx: np.ndarray) -> jax.Array:
    n, p = jax.process_count(), jax.process_index()
    local = x_Bx.reshape(n, x_Bx.shape[0] // n, *x_Bx.shape[1:])[p]
    return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local)

  def get(self, y_Bx: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(y_Bx, tiled=True))
    return np.asarray(y_Bx)


def _dict_path(path) -> tuple:
  """The trailing dict keys of a key path: a parameter's name inside any tree shaped like params."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def state_shardings(abstract_state, mesh: Mesh):
  """Shardings for a train state (or a pytree of them) whose params may hold logical-axis boxes.

  Parameters take the mesh axes their logical names map to; optimizer-state leaves
  shaped like their parameter (Adam's moments) follow it; everything else is replicated.
  The result is shaped like `nn.unbox(abstract_state)`.
  """
  def train_state_specs(state: TrainState):
    specs = nn.get_partition_spec(state)
    # An optimizer-state leaf belongs to the parameter whose dict path ends its own path (mu/block_0/...).
    # (Matched by path, not with optax.tree_map_params, which fails on multi_transform's masked states.)
    param_specs = {_dict_path(path): (leaf.shape, spec) for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(nn.unbox(state.params))[0],
        jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)))}

    def opt_spec(path, leaf):
      shape, spec = param_specs.get(_dict_path(path), (None, P()))
      return spec if shape == leaf.shape else P()
    return specs.replace(opt_state=jax.tree_util.tree_map_with_path(opt_spec, nn.unbox(state.opt_state)))

  def specs(x):
    return train_state_specs(x) if isinstance(x, TrainState) else nn.get_partition_spec(x)

  tree = jax.tree.map(specs, abstract_state,
                      is_leaf=lambda x: isinstance(x, (TrainState, nn.LogicallyPartitioned)))
  shardings = nn.logical_to_mesh_sharding(tree, mesh, RULES)
  return jax.tree.map(lambda s, x: _fit(s, x.shape), shardings, nn.unbox(abstract_state))


def _fit(sharding: NamedSharding, shape: tuple) -> NamedSharding:
  """`sharding` with every mesh axis dropped from a dimension that it does not divide."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))

  def fits(axes, size):
    axes = axes if isinstance(axes, tuple) else (axes,)
    return size % int(np.prod([sharding.mesh.shape[a] for a in axes])) == 0
  fitted = [axes if axes is None or fits(axes, size) else None for axes, size in zip(spec, shape)]
  return sharding if fitted == spec else NamedSharding(sharding.mesh, P(*fitted))
