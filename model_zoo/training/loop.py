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
    return init(init_rng)

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  config_lib.validate(config)
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
      lambda state, batch: exp.task.train_step(state, batch, jax.random.fold_in(train_rng, state.step)),
      in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh)),
      out_shardings=(exp.state_shardings, None), donate_argnums=0)

  total = config.num_train_steps
  progress = Progress(start, total)
  stop = _StopRequest(sync_every=config.log_every_steps)
  try:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, sharding.to_global(next(train_iter), exp.mesh))
      pending.append(metrics)
      stopping = stop(step)
      if step % config.log_every_steps == 0 or step == total:
        rate = progress.rate(step)
        host = jax.device_get(pending)  # float64 means: a resumed run (floats from JSON) agrees exactly
        means = {k: float(np.mean([np.float64(m[k]) for m in host])) for k in host[0]}
        pending = []
        if not np.isfinite(means.get('loss', 0.0)):
          raise UserError(f'training diverged: loss {means["loss"]} at step {step}. The last good checkpoint '
                          f'is kept; try a lower optimizer.learning_rate or optimizer.grad_clip_norm')
        speed = {'steps_per_sec': rate, **exp.task.throughput(state, rate)}
        writer.write(step, 'train', {**means, **speed})
        progress.report(step, means, speed)
      if step % config.eval_every_steps == 0 or step == total:
        eval_metrics, _ = evaluate(state, eval_data)
        writer.write(step, 'eval', eval_metrics)
        print(f'eval at step {step}: ' + '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()),
              flush=True)
      if step % config.checkpoint_every_steps == 0 or step == total or stopping:
        ckpt.save(step, state, train_iter, pending)
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
