"""The task interface: the only place where a model meets its loss.

The drivers (the training loop, eval.py) call exactly these methods, and know nothing of models
or losses:

  init_state(rng, batch)           -> state            (traced once, to get shapes and shardings)
  train_step(state, batch, rng[, teacher])
                                   -> state, metrics   (jitted; metrics are scalars; a Teacher for a
                                      distilled run, SupervisedTask only)
  eval_step(state, batch)          -> stats            (jitted; stats add up over batches)
  eval_metrics(stats)              -> {name: float}
  eval_artifacts(stats, workdir)   -> writes plots or files into a model_zoo.workdir.Workdir (optional)
  throughput(state, steps_per_sec) -> {name: float} such as tokens/s and MFU (optional)
  variables(state), with_variables(state, variables)
                                   -> the model's variables ({'params': ..., 'batch_stats': ...}) in a
                                      state, and a fresh state (new optimizer) holding given ones:
                                      what fine-tuning and the tools work on
  predict(state, batch)            -> the model's output on a batch, in evaluation mode
  attribution(variables, batch, baseline)
                                   -> an Attribution: the model as a function of its input, for
                                      model_zoo.interpret (classifiers)
  attention(variables, batch)      -> {layer: attention probabilities [B, N, T, S]} of every attention
                                      layer on a batch (models with the shared attention)
  serving()                        -> {name: Serving}: the inference functions that export and serving
                                      run, on weights and named inputs alone (optional)
  teacher_agreement(state, batch, teacher)
                                   -> sums for eval's `teacher_agreement` (a distilled run)
  decode_splits()                  -> the splits `decode_metrics` reads (eval.py loads them)
  scorers()                        -> {name: (config, workdir)}: trained models `decode_metrics` needs
                                      (eval.py restores each, training it first if it has no checkpoint)
  decode_metrics(state, data, workdir, scorers, rows)
                                   -> {name: value} that need more than a forward pass, such as BLEU
                                      of decoded translations (optional)

A task is built from the config and `info`, what it needs to know of the data (classes, tokenizer,
an example): the same whichever split the driver reads. A task that trains one model with one
optimizer subclasses `SupervisedTask` and writes `loss_from_outputs` and `output_weights` (the loss of
the model's outputs, and the weight of each output position: then it can be distilled), or all of
`loss_fn`; one with several models or optimizers
(a GAN) implements `init_state`, `train_step`, `variables` and `with_variables` itself, with any
pytree as its state. The model is reached through model_zoo.models.protocol, never by its class.
"""
import abc
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from model_zoo.compression import pruning
from model_zoo.data.base import DataInfo, Dataset
from model_zoo.errors import UserError
from model_zoo.models import protocol, registry
from model_zoo.tasks import losses
from model_zoo.training import optimizers
from model_zoo.training.state import TrainState
from model_zoo.transfer import finetune
from model_zoo.workdir import Workdir


def quantization_aware(model: nn.Module, config: ml_collections.ConfigDict) -> nn.Module:
  """The model a task trains: with quantized forward passes under config.quantization.mode='qat'
  (model_zoo.compression.quantization, imported only then), else `model`."""
  if config.quantization.mode != 'qat':
    return model
  from model_zoo.compression import quantization  # pylint: disable=g-import-not-at-top
  return quantization.quantized_model(model, config.quantization)


class Teacher(struct.PyTreeNode):
  """A trained model that a student learns from (knowledge distillation): its task, static, and its
  variables, passed to each step as an argument (never in the student's state, optimizer or checkpoint)."""
  task: 'SupervisedTask' = struct.field(pytree_node=False)
  variables: dict

  def outputs(self, batch):
    """The teacher's outputs on the student's batch, in evaluation mode, under stop_gradient."""
    params = self.variables['params']
    model_state = {k: v for k, v in self.variables.items() if k != 'params'}
    out, _ = self.task.apply(params, model_state, self.task.model_inputs(batch), train=False,
                             **self.task.model_kwargs(batch))
    return jax.lax.stop_gradient(out)

@dataclasses.dataclass(frozen=True)
class Input:
  """The shape of one example of an input (no batch axis; a string names a dimension that any size may take,
  such as a prompt's 'length') and its dtype."""
  shape: tuple
  dtype: Any


@dataclasses.dataclass(frozen=True)
class Serving:
  """One inference function of a task: `fn(weights, inputs) -> outputs`, where `inputs` and `outputs` are dicts
  (of arrays, or of pytrees of them such as a cache) with a leading batch axis and `weights` is
  `weights_of(variables)`, the variables it reads. `reference(data, earlier)` makes a few inputs to check it
  on, from the eval data or from `earlier`, {function: (inputs, outputs)} of the functions before it (a decode
  step starts from a prefill's cache); by default the data's values of the inputs (N(0, I) for latents)."""
  fn: Callable[[dict, dict], dict]
  inputs: dict                                 # name -> Input, or a pytree of them
  weights_of: Callable[[dict], dict] = lambda variables: variables
  reference: Callable[[Dataset, dict], dict] | None = None
  notes: dict = dataclasses.field(default_factory=dict)   # what a caller must know, for signature.json
  constraints: tuple[str, ...] = ()      # on the named dimensions, for jax.export ('length <= 128')


@dataclasses.dataclass(frozen=True)
class Attribution:
  """A classifier as a function of a continuous input, for model_zoo.interpret: `logits(x)` [B, C] of
  x [B, *U, *F] (U the axes of the units attributed: an image's H, W or a token row's T; F the features of
  a unit: channels, or a token's embedding), the baseline x' that attributions compare x with, the units
  that may be changed (`valid` [B, *U]; not padding, [CLS] or [SEP]) and the labels [B]."""
  x: jax.Array
  baseline: jax.Array
  logits: Callable[[jax.Array], jax.Array]
  valid: jax.Array
  labels: jax.Array


def model_state_of(variables: dict) -> dict:
  """The collections of a model's variables other than its parameters (batch statistics)."""
  return {k: v for k, v in variables.items() if k != 'params'}


def example_spec(x) -> Input:
  """The Input of one example `x` of a data set's `info.example`."""
  x = np.asarray(x)
  return Input(x.shape, x.dtype)


def micro_batches(batch: dict, steps: int) -> dict:
  """`batch` as `steps` micro-batches on a new leading axis: micro-batch i takes rows i, i + steps, ..., so that
  each one stays spread over all devices."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1), batch)


def total_weight(w_A):
  """The micro-batches' weights `w_A` summed; an empty batch counts as one, as losses.means counts it."""
  return jnp.maximum(jnp.sum(w_A), 1.0)


def weighted_mean(metrics_A: dict, w_A) -> dict:
  """Each metric's mean over micro-batches weighted by `w_A`."""
  total = total_weight(w_A)
  return jax.tree.map(lambda m: jnp.sum(m * w_A) / total, metrics_A)


class Task(abc.ABC):
  # Metrics of `train_step` that training takes on logged steps only, the rest averaged over the steps between two
  # logs: the training step leaves them out, so XLA drops their computation (an argmax over the vocabulary at every
  # position is not free), and a logged step computes them in a forward pass of its own (Experiment.logged_metrics).
  logged_only: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, info: DataInfo):
    self.config = config
    self.info = info

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict):
    """A UserError for a config this task cannot run, from the config alone (before any data is read)."""

  @abc.abstractmethod
  def init_state(self, rng: jax.Array, batch: dict):
    """A fresh train state; `batch` gives input shapes. Params may carry logical-axis boxes."""

  @abc.abstractmethod
  def train_step(self, state, batch: dict, rng: jax.Array):
    """One optimizer update: -> (state, {name: scalar})."""

  @abc.abstractmethod
  def eval_step(self, state, batch: dict) -> dict:
    """Sums over the batch (weighted by batch['mask']) that `eval_metrics` turns into metrics."""

  @abc.abstractmethod
  def eval_metrics(self, stats: dict) -> dict[str, float]:
    """Scalar metrics from stats summed over the whole eval split."""

  @abc.abstractmethod
  def variables(self, state) -> dict:
    """The model's variables in `state`, shaped as `model.init` returns them."""

  @abc.abstractmethod
  def with_variables(self, state, variables: dict):
    """A state like `state` that holds `variables`, with a fresh optimizer state and step 0."""

  def eval_artifacts(self, stats: dict, workdir: Workdir):
    """Plots or files from the summed eval stats; none by default."""

  def throughput(self, state, steps_per_sec: float) -> dict[str, float]:
    """Speed figures beyond steps/s, logged with the training metrics; none by default."""
    del state, steps_per_sec
    return {}

  def serving(self) -> dict[str, Serving]:
    """The inference functions of the model, by name ('model' for a model with one)."""
    raise UserError(f'the {self.config.task} task has no inference function to export or serve yet; '
                    f'--format=safetensors exports its weights')

  # What eval.py --mode=interpret can show of this task's model (model_zoo.interpret.report), the default first.
  interpretations: tuple[str, ...] = ()

  def attribution(self, variables: dict, batch: dict, baseline: str) -> Attribution:
    """The model as a function of its continuous input, for attributions (classifiers only)."""
    raise UserError(f'attributions are taken of a classifier\'s class scores; the {self.config.task} task has '
                    f'none (model_zoo.interpret lists what each task offers)')

  def attention(self, variables: dict, batch: dict) -> dict[str, jax.Array]:
    """{module path: attention probabilities [B, N, T, S]} of each attention layer, in evaluation mode."""
    raise UserError(f'the {self.config.task} task has no attention maps')

  def decode_splits(self) -> tuple[str, ...]:
    """The splits `decode_metrics` reads; none by default."""
    return ()

  def scorers(self) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
    """Other trained models `decode_metrics` needs, by name: (config, workdir or '' for the default)."""
    return {}

  def decode_metrics(self, state, data: dict[str, Dataset], workdir: Workdir,
                     scorers: dict[str, Callable] | None = None, rows=None) -> dict:
    """Metrics of generated output (and files of it in `workdir`), for eval.py; none by default.
    `data` holds the splits of `decode_splits`, `scorers` a prediction function of each of `scorers()`;
    `rows` (model_zoo.training.sharding.BatchRows) splits inference batches over the mesh's processes."""
    del state, data, workdir, scorers, rows
    return {}


class SupervisedTask(Task):
  """One model, one optimizer. Subclasses write `loss_fn`; gradient accumulation is here.

  Accumulation weights each micro-batch by `loss_weight` (the count its mean loss divides by: its
  examples, or its targets for token losses), so `grad_accum_steps` micro-batches give the gradient
  of one big batch. The exception is BatchNorm: each micro-batch is normalised by its own statistics
  (and updates the running ones in turn), as smaller batches on more devices would be.
  """

  def __init__(self, config, info):
    super().__init__(config, info)
    self.model = quantization_aware(self.build_model(), config)   # QAT: quantized forward passes
    # Built once: the state carries `tx` as static metadata, which must stay the same object.
    self.tx = optimizers.build(config.optimizer, config.num_train_steps, frozen=finetune.frozen_fn(config))
    if pruning.enabled(config):
      self.tx = pruning.prune(self.tx, config.pruning)

  def build_model(self) -> nn.Module:
    return registry.build(self.config.model)

  def model_inputs(self, batch: dict) -> tuple:
    """Positional inputs of the model, taken from a batch."""
    raise NotImplementedError

  def model_kwargs(self, batch: dict) -> dict:
    """Keyword inputs of the model (such as a padding mask), taken from a batch; none by default."""
    del batch
    return {}

  def loss_from_outputs(self, outputs, batch) -> tuple[jax.Array, dict]:
    """-> (scalar loss, {name: scalar}) of the model's training-mode `outputs` on `batch`."""
    raise NotImplementedError(f'{type(self).__name__} writes loss_fn, or loss_from_outputs and output_weights')

  def output_weights(self, batch) -> jax.Array:
    """The weight of each output position (logits.shape[:-1]; 0 for padding): what distillation and the
    teacher agreement average over."""
    raise NotImplementedError(f'{type(self).__name__} has no per-position outputs to distill')

  def loss_fn(self, params, model_state, batch, rng, teacher: 'Teacher | None' = None):
    """-> (scalar loss, (metrics, new model_state)) on a training batch. With a teacher (knowledge
    distillation), alpha * distance(student, teacher) + (1 - alpha) * the task's loss, the teacher in
    evaluation mode on the same batch, under stop_gradient (model_zoo.tasks.losses.distillation)."""
    outputs, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                      **self.model_kwargs(batch))
    loss, metrics = self.loss_from_outputs(outputs, batch)
    if teacher is not None:
      d, w = self.config.distill, self.output_weights(batch)
      per_position = losses.distillation(outputs, teacher.outputs(batch), d.temperature, d.distance)
      distill_loss = jnp.sum(per_position * w) / jnp.maximum(jnp.sum(w), 1.0)
      metrics = {**metrics, 'task_loss': loss, 'distill_loss': distill_loss}
      loss = d.alpha * distill_loss + (1 - d.alpha) * loss
      metrics['loss'] = loss
    return loss, (metrics, model_state)

  def teacher_agreement(self, state, batch, teacher: 'Teacher') -> dict:
    """Sums for the eval split's `teacher_agreement`: positions where the student's top-1 output is the
    teacher's, and the positions counted."""
    w = self.output_weights(batch)
    w = w * batch['mask'].reshape(batch['mask'].shape + (1,) * (w.ndim - 1))
    same = jnp.argmax(self.predict(state, batch), -1) == jnp.argmax(teacher.outputs(batch), -1)
    return {'teacher_agree': jnp.sum(same * w), 'teacher_count': jnp.sum(w)}

  def loss_weight(self, batch) -> jax.Array:
    """What `loss_fn`'s mean divides by on this batch; the number of examples unless overridden."""
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])

  def init_state(self, rng, batch):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({'params': params_rng, 'dropout': dropout_rng},
                                *self.model_inputs(batch), train=False, **self.model_kwargs(batch))
    params = variables.pop('params')
    return TrainState.create(params=params, tx=self.tx, model_state=dict(variables))

  def variables(self, state):
    return {'params': state.params, **state.model_state}

  def with_variables(self, state, variables):
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return TrainState.create(params=variables['params'], tx=state.tx, model_state=model_state)

  def apply(self, params, model_state, inputs, *, train: bool, rng=None, **kwargs):
    """Model output, and the updated model_state when training mutates one (batch statistics)."""
    variables = {'params': params, **model_state}
    rngs = {'dropout': rng} if rng is not None else {}
    if train and model_state:
      return self.model.apply(variables, *inputs, train=True, rngs=rngs, mutable=list(model_state), **kwargs)
    return self.model.apply(variables, *inputs, train=train, rngs=rngs, **kwargs), model_state

  def predict(self, state, batch):
    return self.apply(state.params, state.model_state, self.model_inputs(batch), train=False,
                      **self.model_kwargs(batch))[0]

  def attention(self, variables, batch):
    """Every shared attention layer sows its probabilities when 'intermediates' is mutable
    (model_zoo.models.layers.MultiHeadAttention); a model without one gets a UserError."""
    _, captured = self.model.apply(variables, *self.model_inputs(batch), train=False, mutable=['intermediates'],
                                   **self.model_kwargs(batch))
    sown = protocol.to_layout(captured.get('intermediates', {}), 'unrolled')   # scanned blocks' maps, one a block
    maps = {'/'.join(protocol.path_names(path[:-2])): p for path, p in jax.tree_util.tree_flatten_with_path(sown)[0]
            if protocol.path_names(path)[-2] == 'attention_probabilities'}
    if not maps:
      raise UserError(f'attention maps need a model with attention layers (ViT, BERT, GPT, the Transformer); '
                      f'config.model.name={self.config.model.name!r} has none')
    return maps

  # Serving: the batch keys the model reads at inference, the batch they make, and what is returned.
  serving_inputs: tuple[str, ...] = ()

  def serving_batch(self, inputs: dict) -> dict:
    return inputs

  def serving_outputs(self, outputs) -> dict:
    return {'outputs': outputs}

  def serving(self):
    if not self.serving_inputs:
      return super().serving()

    def model(variables, inputs):
      batch = self.serving_batch(inputs)
      model_state = {k: v for k, v in variables.items() if k != 'params'}
      outputs = self.apply(variables['params'], model_state, self.model_inputs(batch), train=False,
                           **self.model_kwargs(batch))[0]
      return self.serving_outputs(outputs)
    return {'model': Serving(model, {k: example_spec(self.info.example[k]) for k in self.serving_inputs})}

  def train_step(self, state: TrainState, batch, rng, teacher: 'Teacher | None' = None):
    loss_fn = self.loss_fn if teacher is None else functools.partial(self.loss_fn, teacher=teacher)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    steps = self.config.grad_accum_steps
    if steps == 1:
      (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
    else:
      micro = micro_batches(batch, steps)

      def accumulate(carry, inputs):
        grads_sum, model_state = carry
        i, mb = inputs
        (_, (m, model_state)), g = grad_fn(state.params, model_state, mb, jax.random.fold_in(rng, i))
        w = self.loss_weight(mb)
        return (jax.tree.map(lambda s, g: s + w * g, grads_sum, g), model_state), (m, w)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, model_state), (metrics, w_A) = jax.lax.scan(
          accumulate, (zeros, state.model_state), (jnp.arange(steps), micro))
      total = total_weight(w_A)
      grads = jax.tree.map(lambda g: g / total, grads)
      metrics = weighted_mean(metrics, w_A)
    metrics = {**metrics, 'grad_norm': optax.tree.norm(grads)}
    state = state.apply_gradients(grads, model_state)
    if pruning.enabled(self.config):
      metrics['sparsity'] = pruning.mask_sparsity(state.opt_state)
    return state, metrics

  def logged_metrics(self, state: TrainState, batch, rng, teacher: 'Teacher | None' = None) -> dict:
    """The metrics `train_step` leaves to logged steps (Task.logged_only), from forward passes alone on the state
    before its update: the same micro-batches and randomness, each micro-batch weighted as train_step weighs it."""
    kwargs = {} if teacher is None else {'teacher': teacher}

    def one(mb, rng):
      _, (metrics, _) = self.loss_fn(state.params, state.model_state, mb, rng, **kwargs)
      return {k: metrics[k] for k in self.logged_only}, self.loss_weight(mb)
    steps = self.config.grad_accum_steps
    if steps == 1:
      return one(batch, rng)[0]
    metrics, w_A = jax.lax.map(lambda x: one(x[1], jax.random.fold_in(rng, x[0])),
                               (jnp.arange(steps), micro_batches(batch, steps)))
    return weighted_mean(metrics, w_A)
