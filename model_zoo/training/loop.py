"""The training loop. It knows nothing of models or losses: those live in the task.

config -> mesh -> input pipeline -> task -> state (fresh, or restored with the
pipeline's position) -> jitted steps -> metrics.jsonl, TensorBoard, checkpoints.
"""
import dataclasses
import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from model_zoo import config as config_lib
from model_zoo import tasks
from model_zoo.errors import UserError
from model_zoo.data import pipeline, sources
from model_zoo.training import sharding
from model_zoo.training.checkpoints import Checkpoints
from model_zoo.training.state import TrainState
from model_zoo.transfer import finetune
from model_zoo.training.writer import MetricWriter, Progress


@dataclasses.dataclass
class Experiment:
  """What train and eval both build from a config: devices, task, and the state's layout."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: tasks.Task
  abstract_state: object   # jax.ShapeDtypeStruct leaves that carry their sharding
  state_shardings: object
  example: dict            # a batch of one example, for shapes

  def init_state(self):
    init_rng = jax.random.fold_in(jax.random.key(self.config.seed), 0)
    init = jax.jit(lambda rng: nn.unbox(self.task.init_state(rng, self.example)),
                   out_shardings=self.state_shardings)
    state = init(init_rng)
    if self.config.init_from:  # fine-tuning: the backbone from a pretrained model, a fresh optimizer
      params = finetune.initial_params(self.config, state.params)
      state = jax.device_put(TrainState.create(params=params, tx=state.tx, model_state=state.model_state),
                             self.state_shardings)
    return state

  def checkpoints(self, workdir: str) -> Checkpoints:
    return Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=self.config.max_checkpoints_to_keep)


def build_experiment(config: ml_collections.ConfigDict, data: sources.Dataset) -> Experiment:
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
  task = tasks.build(config, data)
  example = jax.tree.map(lambda x: np.asarray(x)[None], data.preprocess(data.source[0]))
  boxed = jax.eval_shape(task.init_state, jax.random.key(0), example)
  state_shardings = sharding.state_shardings(boxed, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.unbox(boxed), state_shardings)
  return Experiment(config, mesh, task, abstract_state, state_shardings, example)


def make_eval_fn(exp: Experiment):
  """-> evaluate(state, data): the task's metrics and summed stats over a whole split."""
  eval_step = jax.jit(exp.task.eval_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh)))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def evaluate(state, data: sources.Dataset):
    totals = None
    for local in pipeline.eval_batches(data, batch_size=exp.config.batch_size, prefetch=exp.config.dataset.prefetch):
      stats = eval_step(state, sharding.to_global(local, exp.mesh))
      totals = stats if totals is None else add(totals, stats)
    totals = jax.tree.map(np.asarray, jax.device_get(totals))
    return exp.task.eval_metrics(totals), totals
  return evaluate


class _StopRequest:
  """SIGTERM/SIGINT ask the loop to save a checkpoint at the current step and return.

  With several processes, all must stop at the same step: they agree at log steps.
  """

  def __init__(self, sync_every: int):
    self.signal = None
    self.sync_every = sync_every
    self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __call__(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signal is not None
    if step % self.sync_every:
      return False
    return bool(multihost_utils.process_allgather(np.int32(self.signal is not None)).any())

  def restore(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def _finite(metrics: list[dict], step: int) -> list[dict]:
  """The metrics, if every loss in them (`loss`, `*_loss`) is finite; training has diverged otherwise."""
  if not all(np.isfinite(v) for m in metrics for k, v in m.items() if k == 'loss' or k.endswith('_loss')):
    raise UserError(f'training diverged: the loss is not finite by step {step}. No checkpoint was written '
                    f'after the last finite one; try a lower optimizer.learning_rate, or '
                    f'optimizer.grad_clip_norm')
  return metrics


# Keys that may change when a run resumes: how long it runs and how it reports, not what it computes.
RESUMABLE_CHANGES = ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                     'max_checkpoints_to_keep', 'dataset.prefetch', 'dataset.data_dir', 'dataset.download')


def _check_same_run(config: ml_collections.ConfigDict, workdir: str):
  """A workdir resumes only with the config it was started with (up to RESUMABLE_CHANGES)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flat(json.load(f))
  current = _flat(json.loads(config.to_json_best_effort()))
  changed = [k for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES]
  if changed:
    k = changed[0]
    raise UserError(f'{workdir} holds a run with {k}={saved.get(k)!r}, but the config has {k}={current.get(k)!r}'
                    f'{f" (and {len(changed) - 1} more differences)" if len(changed) > 1 else ""}; resume it with '
                    f'the same config, or use a new --workdir')


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  config = finetune.resolve(config)
  config_lib.validate(config)
  finetune.prepare_workdir(config, workdir)
  train_data = sources.load(config.dataset, config.dataset.train_split, workdir)
  eval_data = sources.load(config.dataset, config.dataset.eval_split, workdir)
  exp = build_experiment(config, train_data)
  train_iter = pipeline.train_iterator(train_data, batch_size=config.batch_size, seed=config.seed,
                                       prefetch=config.dataset.prefetch)
  ckpt = exp.checkpoints(workdir)
  start = ckpt.latest_step()
  if start is None:
    start, state, pending = 0, exp.init_state(), []
  else:
    _check_same_run(config, workdir)
    state, pending = ckpt.restore(start, exp.abstract_state, train_iter)
    print(f'resumed from the checkpoint at step {start} in {ckpt.directory}', flush=True)

  # Only now, with the config checked against data and checkpoint, is the workdir written.
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = MetricWriter(workdir, start)
  evaluate = make_eval_fn(exp)
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  train_step = jax.jit(
      lambda state, batch, step: exp.task.train_step(state, batch, jax.random.fold_in(train_rng, step)),
      in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None),
      out_shardings=(exp.state_shardings, None), donate_argnums=0)

  total = config.num_train_steps
  progress = Progress(start, total)
  stop = _StopRequest(sync_every=config.log_every_steps)
  try:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, sharding.to_global(next(train_iter), exp.mesh), np.int32(step - 1))
      pending.append(metrics)
      if len(pending) > 1:  # at most one step in flight: a stop signal is served within a step or two
        jax.block_until_ready(pending[-2])
      stopping = stop(step)
      if step % config.log_every_steps == 0 or step == total:
        host = _finite(jax.device_get(pending), step)
        rate = progress.rate(step)
        # float64 means: a resumed run (its pending metrics come back from JSON) agrees exactly
        means = {k: float(np.mean([np.float64(m[k]) for m in host])) for k in host[0]}
        pending = []
        speed = {'steps_per_sec': rate, **exp.task.throughput(state, rate)}
        writer.write(step, 'train', {**means, **speed})
        progress.report(step, means, speed)
      if step % config.eval_every_steps == 0 or step == total:
        eval_metrics, _ = evaluate(state, eval_data)
        writer.write(step, 'eval', eval_metrics)
        print(f'eval at step {step}: ' + '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()),
              flush=True)
      if step % config.checkpoint_every_steps == 0 or step == total or stopping:
        ckpt.save(step, state, train_iter, _finite(jax.device_get(pending), step))
      if stopping:
        print(f'stopped by signal at step {step}; checkpoint saved; run the same command to resume',
              flush=True)
        break
    if start >= total:
      print(f'{workdir} is already trained to step {start} (num_train_steps={total})', flush=True)
  finally:
    stop.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state
