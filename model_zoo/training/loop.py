"""The training loop. It knows nothing of models or losses: those live in the task.

config -> checks, data and task (model_zoo.experiment, nothing written yet) -> state (fresh, or
restored with the pipeline's position) -> the work directory's files -> jitted steps ->
metrics.jsonl, TensorBoard, checkpoints.
"""
import os
import signal

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from model_zoo.compression import distill
from model_zoo.data import pipeline
from model_zoo.data.base import Dataset
from model_zoo.paths import write_atomically
from model_zoo.errors import UserError
from model_zoo.experiment import Experiment, prepare
from model_zoo.training import sharding
from model_zoo.training.writer import MetricWriter, Progress


_KILL_AT = os.environ.get('MODEL_ZOO_KILL_AT', '').split(':')


def fault_point(point: str, step: int):
  """Fault injection, for the tests that kill or stop training anywhere (tests/test_kill.py,
  tests/test_multihost.py): with the environment variable MODEL_ZOO_KILL_AT='<point>:<step>[:<signal>]',
  this process sends itself the signal (SIGKILL unless named, e.g. SIGTERM) there. Points: 'step' (after
  the update of `step`), 'eval' (halfway through the evaluation at `step`), 'save' (while the checkpoint of
  `step` is being written, asynchronously)."""
  if _KILL_AT[:2] == [point, str(step)]:
    os.kill(os.getpid(), getattr(signal, _KILL_AT[2] if len(_KILL_AT) > 2 else 'SIGKILL'))


def make_eval_fn(exp: Experiment):
  """-> evaluate(state, data, step=None): the task's metrics and summed stats over a whole split (and, for
  a distilled run, `teacher_agreement`: the share of outputs whose top-1 is the teacher's)."""
  def step_fn(state, batch, teacher):
    stats = exp.task.eval_step(state, batch)
    return stats if teacher is None else {**stats, **exp.task.teacher_agreement(state, batch, teacher)}
  eval_step = jax.jit(sharding.constrained(step_fn, exp.mesh),
                      in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))

  def evaluate(state, data: Dataset, step: int | None = None):
    totals = None
    # Batches of one micro-batch's rows: what a device holds at once in training fits in evaluation too.
    micro = exp.config.batch_size // exp.config.grad_accum_steps
    for i, local in enumerate(pipeline.eval_batches(data, batch_size=micro,
                                                    prefetch=exp.config.dataset.prefetch)):
      # Summed on the host, in the stats' own dtype (the same float32 adds): a device-side add between the
      # eval steps' all-reduces deadlocked two CPU processes (gloo) in about a third of runs.
      stats = jax.tree.map(np.asarray, jax.device_get(eval_step(state, sharding.to_global(local, exp.mesh),
                                                                exp.teacher)))
      totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
      if i == 0 and step is not None:
        fault_point('eval', step)
    metrics = exp.task.eval_metrics(totals)
    if exp.teacher is not None:
      metrics['teacher_agreement'] = float(totals['teacher_agree'] / max(totals['teacher_count'], 1))
    return metrics, totals
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


def _resume_step(ckpt) -> int | None:
  """The latest complete checkpoint; newer, incomplete ones are moved aside (by process 0), not deleted,
  so that their steps can be saved again."""
  start = ckpt.latest_step(training=True, report=lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
  newer = [s for s in ckpt.all_steps() if start is None or s > start]
  if newer:
    if jax.process_index() == 0:
      for step in newer:
        print(f'moved the unusable checkpoint of step {step} to {ckpt.set_aside(step)}', flush=True)
    multihost_utils.sync_global_devices('model_zoo: incomplete checkpoints moved aside')
    ckpt.manager.reload()
  return start


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  run = prepare(config, workdir, [config.dataset.train_split, config.dataset.eval_split], staging=True)
  try:
    run.experiment.teacher = distill.teacher(run)
    return _train(run)
  finally:
    run.close()


def _train(run):
  config, exp, workdir = run.config, run.experiment, run.workdir
  train_data, eval_data = run.data[config.dataset.train_split], run.data[config.dataset.eval_split]
  train_iter = pipeline.train_iterator(train_data, batch_size=config.batch_size, seed=config.seed,
                                       prefetch=config.dataset.prefetch)
  ckpt = exp.checkpoints(workdir.path)
  start = _resume_step(ckpt)
  if start is None:
    start, state, pending = 0, exp.init_state(), []
  else:
    state, pending = ckpt.restore(start, exp.abstract_state, train_iter)
    print(f'resumed from the checkpoint at step {start} in {ckpt.directory}', flush=True)

  # Only now, with the config checked against data, model, mesh, batch and checkpoint, is the workdir written.
  run.commit()
  if jax.process_index() == 0:
    write_atomically(workdir.config, config.to_json_best_effort(indent=2, sort_keys=True).encode())
  writer = MetricWriter(workdir, start)
  evaluate = make_eval_fn(exp)
  train_step = exp.train_step()
  logged_metrics = exp.logged_metrics() if exp.task.logged_only else None   # Task.logged_only: on logged steps

  total = config.num_train_steps
  progress = Progress(start, total)
  stop = _StopRequest(sync_every=config.log_every_steps)
  try:
    for step in range(start + 1, total + 1):
      log = step % config.log_every_steps == 0 or step == total
      batch = sharding.to_global(next(train_iter), exp.mesh)
      extra = logged_metrics(state, batch, np.int32(step - 1), exp.teacher) if log and logged_metrics else {}
      state, metrics = train_step(state, batch, np.int32(step - 1), exp.teacher)
      pending.append({**metrics, **extra})
      if len(pending) > 1:  # at most one step in flight: a stop signal is served within a step or two
        jax.block_until_ready(pending[-2])
      stopping = stop(step)
      fault_point('step', step)
      if log:
        host = _finite(jax.device_get(pending), step)
        rate = progress.rate(step)
        # float64 means, over the steps that have each metric (Task.logged_only: this one): a resumed run (its
        # pending metrics come back from JSON) agrees exactly
        means = {k: float(np.mean([np.float64(m[k]) for m in host if k in m])) for k in host[-1]}
        pending = []
        speed = {'steps_per_sec': rate, **exp.task.throughput(state, rate)}
        writer.write(step, 'train', {**means, **speed})
        progress.report(step, means, speed)
      if step % config.eval_every_steps == 0 or step == total:
        eval_metrics, _ = evaluate(state, eval_data, step)
        writer.write(step, 'eval', eval_metrics)
        print(f'eval at step {step}: ' + '  '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()),
              flush=True)
      if step % config.checkpoint_every_steps == 0 or step == total or stopping:
        ckpt.save(step, state, train_iter, _finite(jax.device_get(pending), step))
        fault_point('save', step)
      if stopping:
        print(f'stopped by signal at step {step}; checkpoint saved; run the same command to resume',
              flush=True)
        break
    if start >= total:
      print(f'{workdir.path} is already trained to step {start} (num_train_steps={total})', flush=True)
  finally:
    stop.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state
