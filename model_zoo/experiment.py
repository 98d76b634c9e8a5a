"""What train.py and eval.py share: the checks of a run, in an order that writes nothing until all
have passed, and the Experiment (devices, task, the state's layout) they build.

  1. the config alone: ranges, the names of task, model and data set, the mesh and the batch;
     fine-tuning's source; a resumed run's config against the one it was started with
  2. the data: each split the run needs is loaded; what a data set derives (a tokenizer, an
     encoded split) goes to a staging directory beside the work directory, not into it
  3. the task, its model and the train state, traced for shapes and shardings only
Only then does training `commit` the staged files into the work directory (model_zoo.workdir).
"""
import dataclasses
import fnmatch
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from model_zoo import config as config_lib
from model_zoo.compression import pruning
from model_zoo.compression import settings as quantization_settings
from model_zoo.data import registry as data_registry
from model_zoo.data.base import DataInfo, Dataset
from model_zoo.errors import UserError
from model_zoo.models import registry as model_registry
from model_zoo.tasks import registry as task_registry
from model_zoo.tasks.base import Task
from model_zoo.training import optimizers, sharding
from model_zoo.training.checkpoints import Checkpoints
from model_zoo.transfer import finetune
from model_zoo.workdir import Staging, Workdir


@dataclasses.dataclass
class Experiment:
  """What train and eval both build from a config: devices, task, and the state's layout."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: Task
  abstract_state: object   # jax.ShapeDtypeStruct leaves that carry their sharding
  state_shardings: object
  example: dict            # a batch of one example, for shapes
  teacher: object = None   # model_zoo.tasks.base.Teacher, for a distilled run (model_zoo.compression.distill)

  def init_state(self):
    init_rng = jax.random.fold_in(jax.random.key(self.config.seed), 0)
    init = jax.jit(lambda rng: nn.unbox(self.task.init_state(rng, self.example)),
                   out_shardings=self.state_shardings)
    state = init(init_rng)
    if self.config.init_from:  # fine-tuning: the backbone from a pretrained model, a fresh optimizer
      variables = finetune.initial_variables(self.config, self.task.variables(state))
      # A fresh optimizer state for them, made in place: each process computes only its shards.
      state = jax.jit(self.task.with_variables, out_shardings=self.state_shardings)(state, variables)
    return state

  def step_rng(self, step):
    """The randomness (dropout) of training step `step` (counted from 0)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 1), step)

  def train_step(self):
    """The jitted training step, (state, global batch, step index, teacher or None) -> (state, metrics), traced with
    the activation constraints. The task's logged-only metrics (Task.logged_only) are left out of its outputs, so
    XLA never computes them: the update is the same program whatever is logged."""
    def step_fn(state, batch, step, teacher):
      kwargs = {} if teacher is None else {'teacher': teacher}
      state, metrics = self.task.train_step(state, batch, self.step_rng(step), **kwargs)
      return state, {k: v for k, v in metrics.items() if k not in self.task.logged_only}
    return jax.jit(sharding.constrained(step_fn, self.mesh),
                   in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh), None, None),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def logged_metrics(self):
    """The jitted logged-only metrics of a training step (SupervisedTask.logged_metrics), (state, global batch,
    step index, teacher or None) -> {name: scalar}, run before the step's update."""
    def metrics_fn(state, batch, step, teacher):
      return self.task.logged_metrics(state, batch, self.step_rng(step), teacher)
    return jax.jit(sharding.constrained(metrics_fn, self.mesh),
                   in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh), None, None))

  def checkpoints(self, workdir: str) -> Checkpoints:
    return Checkpoints(Workdir(workdir).checkpoints, max_to_keep=self.config.max_checkpoints_to_keep)


def check(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Everything that can be checked from the config alone; -> the device mesh."""
  config_lib.validate(config)
  quantization_settings.check(config)
  pruning.check(config)
  optimizers.check(config.optimizer, config.num_train_steps)
  task_registry.check(config)
  model_registry.check(config.model)
  model_registry.check_platform(config.model, jax.default_backend())
  data_registry.check_name(config.dataset)
  mesh = sharding.make_mesh(config.mesh)
  # config.per_device_batch_size: accumulate as many micro-batches as the devices need (config.json records it).
  config.grad_accum_steps = sharding.accumulation_steps(config.batch_size, config.per_device_batch_size,
                                                        config.grad_accum_steps, mesh)
  sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
  sharding.check_divisible(config.model, config.dataset.get('vocab_size'), mesh)
  return mesh


def build_experiment(config: ml_collections.ConfigDict, info: DataInfo, mesh=None, task: Task | None = None
                     ) -> Experiment:
  """The task built on `info` (or `task`, built already), and the shapes and shardings of its state
  (nothing is allocated)."""
  if mesh is None:
    mesh = check(config)
  task = task_registry.build(config, info) if task is None else task
  example = jax.tree.map(lambda x: np.asarray(x)[None], info.example)
  boxed = jax.eval_shape(task.init_state, jax.random.key(0), example)
  state_shardings = sharding.state_shardings(boxed, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.unbox(boxed), state_shardings)
  return Experiment(config, mesh, task, abstract_state, state_shardings, example)


# Keys that may change when a run resumes: how long it runs, how it reports and on which devices, not
# what it computes (the kernels attention_impl picks and remat compute the same function; a checkpoint's blocks
# are converted between scanned and unrolled layouts as it is restored; loss_chunks computes the same loss; with
# per_device_batch_size, grad_accum_steps follows the devices (check_same_run); model.remat is a key of older runs).
RESUMABLE_CHANGES = ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                     'max_checkpoints_to_keep', 'dataset.prefetch', 'dataset.data_dir', 'dataset.download',
                     'mesh.*', 'loss_chunks', 'model.attention_impl', 'model.remat', 'model.remat_policy',
                     'model.scan_layers')
# ... and when a trained run is evaluated, sampled, translated or exported: how it was trained, not its
# model, data or tokenizer. (An optimizer whose state has another structure still fails the checkpoint's
# own check.) `decode.*` is how eval.py decodes, the eval split what it measures, `quantization.*` how it
# quantizes the trained weights.
EVAL_CHANGES = RESUMABLE_CHANGES + ('batch_size', 'grad_accum_steps', 'optimizer.*', 'discriminator_optimizer.*',
                                    'init_from', 'freeze', 'dataset.train_split',
                                    'dataset.eval_split', 'dataset.augment', 'decode.*', 'classifier_workdir',
                                    'classifier.*', 'quantization.*', 'distill.*', 'interpret.*')


def check_same_run(config: ml_collections.ConfigDict, workdir: Workdir, may_change=RESUMABLE_CHANGES,
                   doing: str = 'resume it'):
  """A workdir is resumed (or evaluated) only with the config it was started with, up to `may_change`."""
  if not workdir.config.exists():
    return
  try:
    saved = _flat(json.loads(workdir.config.read_text()))
  except (OSError, ValueError) as e:
    raise UserError(f'{workdir.config} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): the config '
                    f'the run was started with is damaged. Restore it (train.py writes it from the config file and '
                    f'overrides the run used), or move it aside to go on without the check') from e
  current = _flat(json.loads(config.to_json_best_effort()))
  # A shared key the saved config lacks was added to model_zoo after the run started: it ran with its default.
  defaults = _flat(json.loads(config_lib.base_config().to_json_best_effort()))
  if current.get('per_device_batch_size') and saved.get('per_device_batch_size') == current['per_device_batch_size']:
    may_change = (*may_change, 'grad_accum_steps')   # it follows the devices, the global batch stays batch_size
  changed = [k for k in sorted(set(saved) | set(current))
             if saved.get(k, defaults.get(k)) != current.get(k)
             and not any(fnmatch.fnmatchcase(k, p) for p in may_change)]
  if changed:
    k = changed[0]
    was = saved.get(k, defaults.get(k))
    raise UserError(f'{workdir.path} holds a run with {k}={was!r}, but the config has {k}='
                    f'{current.get(k)!r}{f" (and {len(changed) - 1} more differences)" if len(changed) > 1 else ""}; '
                    f'{doing} with the config it was trained with (`--config.{k}={was!r}`), or use a '
                    f'new --workdir')


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


@dataclasses.dataclass
class Run:
  """A checked experiment on its work directory, with the splits loaded so far."""
  config: ml_collections.ConfigDict
  workdir: Workdir
  experiment: Experiment
  data: dict[str, Dataset]
  staging: Staging | None
  tokenizer_from: Workdir | None

  def load(self, splits) -> dict[str, Dataset]:
    """The data of `splits` (loaded once each), reading and staging files as the first splits did."""
    for split in splits:
      if split in self.data:
        continue
      files = self.workdir.data_files(self.staging, self.tokenizer_from)
      if not self.data and self.staging is not None and jax.process_count() > 1:
        self.data[split] = self._load_first_of_several_processes(split, files)
      else:
        self.data[split] = data_registry.load(self.config.dataset, split, files)
    return {split: self.data[split] for split in splits}

  def _load_first_of_several_processes(self, split: str, files) -> Dataset:
    """Process 0 loads first and trains the tokenizer, if the run needs a new one; the others receive
    its bytes and use them (so that one tokenizer is trained, and only process 0 writes it)."""
    proto, failure = b'', None
    if jax.process_index() == 0:
      try:
        data = data_registry.load(self.config.dataset, split, files)
      except UserError as e:
        failure, proto = e, None   # the others must not wait for a tokenizer that will not come
      if failure is None and files.new_tokenizer and os.path.exists(files.new_tokenizer):
        with open(files.new_tokenizer, 'rb') as f:
          proto = f.read()
    proto = _broadcast_bytes(proto)
    if failure is not None:
      raise failure
    if proto is None:
      raise UserError('process 0 could not load the data set; its error says why')
    if jax.process_index() == 0:
      return data
    if proto:   # staged here too (this process commits nothing), so that the later splits use it
      print(f'process {jax.process_index()}: using the tokenizer that process 0 trained', flush=True)
      path = self.staging.path(self.workdir.tokenizer.name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(proto)
      files = self.workdir.data_files(self.staging, self.tokenizer_from)
    return data_registry.load(self.config.dataset, split, files)

  def commit(self):
    """Moves the staged files into the work directory, and copies the tokenizer of the run that
    fine-tuning starts from; creates the work directory. With several processes, process 0 does it."""
    if jax.process_index() != 0:
      return
    copies = {}
    if self.tokenizer_from is not None and self.tokenizer_from.tokenizer.exists():
      copies[self.tokenizer_from.tokenizer] = self.workdir.tokenizer.name
    if self.staging is not None:
      self.staging.commit(copies)

  def close(self):
    if self.staging is not None:
      self.staging.close()


def _broadcast_bytes(data: bytes | None) -> bytes | None:
  """Process 0's `data` (or None) on every process (a collective: every process must call it)."""
  n = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if data is None else len(data))))
  if n <= 0:
    return None if n < 0 else b''
  buffer = np.frombuffer(data, np.uint8) if jax.process_index() == 0 else np.zeros(n, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def prepare(config: ml_collections.ConfigDict, workdir: str, splits, *, staging: bool) -> Run:
  """Checks `config` and loads `splits` (the first one builds the task); with `staging`, files the
  data derives are kept to be committed, else they live in memory only. Writes nothing into `workdir`."""
  config = finetune.resolve(config)
  mesh = check(config)
  wd = Workdir(workdir)
  wd.check(write=staging)
  tokenizer_from = finetune.source_workdir(config, wd)
  if tokenizer_from is None and config.distill.teacher and not wd.has_checkpoints():
    tokenizer_from = Workdir(config.distill.teacher)   # a student's tokens are its teacher's
  if staging and wd.has_checkpoints():
    check_same_run(config, wd)
  elif not staging:
    check_same_run(config, wd, EVAL_CHANGES, 'evaluate it')
  run = Run(config, wd, None, {}, Staging(wd) if staging else None, tokenizer_from)
  try:
    data = run.load(list(dict.fromkeys(splits)))
    run.experiment = build_experiment(config, data[splits[0]].info, mesh)
  except BaseException:
    run.close()
    raise
  return run
