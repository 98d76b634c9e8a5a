"""Orbax checkpoints of the train state together with the input pipeline's position.

Each step directory holds `state` (the train state, restorable onto any mesh), `data`
(the grain iterator state, one JSON file per process) and `log` (the per-step metrics
not yet averaged into a metrics.jsonl line), committed atomically.

A step directory that is incomplete or damaged (a part missing, a JSON file cut short) is never
restored: `latest_step` passes over it and says so. Training moves it aside (`set_aside`), so that
the step can be saved again, and deletes nothing.

A checkpoint of a model with scanned blocks restores into the same model unrolled, and the other way round
(config.model.scan_layers may change between runs): the state is read in the checkpoint's layout and converted
(model_zoo.models.protocol.to_layout).
"""
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.models import protocol


def _shapes(tree) -> dict[str, tuple]:
  """{'a/b/c': shape} for a pytree of arrays, or Orbax's metadata of one (where dataclasses and
  named tuples became dicts): keys, attribute names and indices all become path parts."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  part = lambda k: str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
  return {'/'.join(map(part, path)): tuple(leaf.shape) for path, leaf in flat}


def restore_on_host(manager: ocp.CheckpointManager, step: int, item: str, shapes):
  """The `item` of the checkpoint at `step` as host numpy arrays, read onto one local device as `shapes`
  (a tree with .shape and .dtype leaves) gives them."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), shapes)
  restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
  return jax.tree.map(np.asarray, restored)


def _abstract_block(s: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
  """Block i of a stacked variable's shape (its leading axis dropped, from the sharding too)."""
  del i
  sharding = s.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=sharding)


def _abstract_stack(blocks: list) -> jax.ShapeDtypeStruct:
  """The shape of a stack of equal variables (a leading axis, not sharded)."""
  s = blocks[0]
  sharding = s.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(blocks), *s.shape), s.dtype, sharding=sharding)


class Checkpoints:

  def __init__(self, directory, *, max_to_keep: int = 3):
    self.directory = paths.path(directory)   # local, or in an object store (gs://...)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                             create=False),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'log': ocp.JsonCheckpointHandler()})

  def latest_step(self, training: bool = False, report=print) -> int | None:
    """The latest step whose checkpoint is complete (with `training`, also its input-pipeline
    position and log); each newer one it passes over is reported with what is wrong with it."""
    for step in sorted(self.all_steps(), reverse=True):
      problem = self.problem(step, training)
      if problem is None:
        return step
      report(f'skipping the checkpoint at step {step} in {self.directory}: {problem}')
    return None

  def problem(self, step: int, training: bool = False) -> str | None:
    """What makes the checkpoint at `step` unusable (for evaluation, or with `training` for
    resuming too), or None. Reads only metadata."""
    path = self.directory / str(step)
    parts = ['state'] + (['data', 'log'] if training else [])
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
      return f'it has no {" or ".join(p + "/" for p in missing)} (a save that did not finish, or removed files)'
    files = ['state/_METADATA']
    if training:
      files += [f'data/{n}' for n in sorted(p.name for p in (path / 'data').iterdir()) if n.endswith('.json')]
      if len(files) == 1:
        return 'its data/ holds no input-pipeline position'
      files.append('log/metadata')
    for name in files:
      try:
        json.loads((path / name).read_text())
      except (OSError, ValueError) as e:
        return f'{name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    return None

  def set_aside(self, step: int) -> str:
    """Moves the step directory out of the way (into checkpoints-skipped/ beside it) and returns where;
    `manager.reload()` then makes the manager forget it."""
    skipped = self.directory.parent / 'checkpoints-skipped'
    n = 0
    while (skipped / (f'{step}.{n}' if n else str(step))).exists():
      n += 1
    target = skipped / (f'{step}.{n}' if n else str(step))
    skipped.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(target)
    return target

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, log: list[dict]):
    self.directory.mkdir(parents=True, exist_ok=True)
    log = [{k: float(v) for k, v in m.items()} for m in jax.device_get(log)]
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        log=ocp.args.JsonSave(log)))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, placed as `abstract_state`'s shardings say.

    With `data_iterator` (training), the iterator is moved to where it was and the
    return value is `(state, log)`; without it (evaluation), just the state.

    Raises UserError, touching nothing on disk, when the checkpoint was written for another model.
    """
    if step not in self.all_steps():
      raise UserError(f'no checkpoint for step {step} in {self.directory}; '
                      f'there are: {self.all_steps() or "none"}')
    problem = self.problem(step, training=data_iterator is not None)
    if problem is not None:
      raise UserError(f'the checkpoint at step {step} in {self.directory} cannot be used: {problem}; '
                      f'choose another --step (there are: {self.all_steps()})')
    target = abstract_state
    saved_shapes = _shapes(self.saved_tree(step))
    saved = protocol.layout(tuple(k.split('/')) for k in saved_shapes)
    wanted = protocol.layout(tuple(k.split('/')) for k in _shapes(abstract_state))
    convert = saved is not None and wanted is not None and saved != wanted
    if convert:   # read in the checkpoint's own layout of the blocks
      abstract_state = protocol.to_layout(abstract_state, saved, take=_abstract_block, join=_abstract_stack)
    self._check_fits(step, saved_shapes, abstract_state)
    if data_iterator is not None:
      self._check_process_count(step)
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args.update(data=grain.checkpoint.CheckpointRestore(data_iterator), log=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      # The shapes fit (checked above), so a failure here is in the files themselves.
      raise UserError(f'the checkpoint at step {step} in {self.directory} could not be read '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); it may be damaged: '
                      f'move {self.directory / str(step)} aside to use the one before it') from e
    state = restored['state']
    if convert:
      state = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), protocol.to_layout(state, wanted), target)
    return state if data_iterator is None else (state, restored['log'])

  def restore_tree(self, step: int) -> dict:
    """The state at `step` as nested dicts of host numpy arrays, whatever model wrote it (fine-tuning
    reads another run's checkpoint: see model_zoo.transfer.finetune)."""
    return restore_on_host(self.manager, step, 'state', self.saved_tree(step))

  def saved_tree(self, step: int) -> dict:
    """The saved state's structure at `step`, as nested dicts with Orbax's metadata (shape, dtype) at the leaves."""
    metadata = self.manager.item_metadata(step)['state']
    return getattr(metadata, 'tree', metadata)

  def restore_partial(self, step: int, abstract) -> dict:
    """The part of the state at `step` that `abstract` names (nested dicts, a sub-tree of the saved state,
    with jax.ShapeDtypeStruct leaves that carry their shardings), read straight into those shardings: each
    process reads only its shards, and nothing `abstract` leaves out (an optimizer state) is read."""
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                               dtype=s.dtype), abstract)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
      return checkpointer.restore(self.directory / str(step) / 'state', args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True))
    finally:
      checkpointer.close()

  def _check_fits(self, step, saved: dict, abstract_state):
    wanted = _shapes(abstract_state)
    if saved == wanted:
      return
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    differ = [f'{k}: checkpoint {saved[k]} vs model {wanted[k]}'
              for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    problems = ([f'shape {differ[0]}'] if differ else []) + (
        [f'{missing[0]} not in checkpoint'] if missing else []) + (
        [f'checkpoint has {extra[0]} that the configured state lacks'] if extra else [])
    raise UserError(f'the checkpoint at step {step} in {self.directory} does not fit the configured '
                    f'model or optimizer ({"; ".join(problems)}). Use the config it was trained with, '
                    f'or a new --workdir; nothing was changed')

  def _check_process_count(self, step):
    """The input pipeline's position is saved per process, so a run resumes with as many processes."""
    names = [p.name for p in (self.directory / str(step) / 'data').iterdir()]
    counts = {int(n.split('-of-')[1].split('.')[0]) for n in names if '-of-' in n}
    if counts and counts != {jax.process_count()}:
      raise UserError(f'the checkpoint at step {step} in {self.directory} was written by {counts.pop()} '
                      f'process(es) and this run has {jax.process_count()}: resume training with the same '
                      f'number of processes (eval.py, which needs no input-pipeline position, can use any)')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
