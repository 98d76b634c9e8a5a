"""Config keys shared by every experiment, their validation, and the one config loader.

Each `configs/*.py` starts from `base_config()` and fills in `model`, `dataset`
and `optimizer`. `validate()` checks ranges and names before anything is built;
types are already enforced by `ml_collections` when a field is overridden.
`load('configs/gpt.py:size=124m')` is how every config file is read (train.py, eval.py, the
configs that build on others, the tests): `configs/` is a package, so a config imports another
with `from configs import cnn`.
"""
import importlib
import importlib.util
import json
import os
import sys

import ml_collections
from etils import epath

from model_zoo.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128                # global: split over all data-parallel devices
  c.grad_accum_steps = 1            # micro-batches per optimizer step (batch_size / this each)
  c.per_device_batch_size = 0       # > 0: rows each device computes at once; grad_accum_steps then follows from the
  #                                   devices: batch_size / (this x data-parallel devices) micro-batches a step
  c.loss_chunks = 0                 # language modelling: > 0, the cross-entropy over the vocabulary in this many
  #                                   pieces of the sequence, each piece's logits recomputed in the backward pass
  c.num_train_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.task = 'classification'
  # Fine-tuning (model_zoo.transfer.finetune): start from a pretrained backbone, optionally frozen.
  c.init_from = ''                  # '' | a workdir (its latest checkpoint) | 'hf:<local directory>'
  c.freeze = 'none'                 # none | backbone (train only the new head and any LoRA adapters)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'
  c.dataset.data_dir = ''           # TFDS data directory; '' = TFDS's default (~/tensorflow_datasets)
  c.dataset.download = False        # let TFDS download a data set that is not on disk
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.prefetch = 4            # batches prepared ahead by background threads
  c.dataset.classes = ''            # image classification: class indices to keep, e.g. '6,7,8,9' ('' = all)
  c.dataset.prepared = ''           # language modelling: a corpus tokenized offline (python -m model_zoo.data.prepare)

  c.model = ml_collections.ConfigDict()
  c.model.name = ''

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'constant'  # constant | warmup_cosine | warmup_linear | rsqrt
  c.optimizer.warmup_steps = 0
  c.optimizer.end_learning_rate_factor = 0.0  # cosine/linear decay ends at lr * this
  c.optimizer.weight_decay = 0.0     # skips biases and normalisation scales
  c.optimizer.grad_clip_norm = 0.0   # 0 = no clipping
  c.optimizer.momentum = 0.9         # momentum, nesterov, rmsprop
  c.optimizer.b1 = 0.9               # adam, adamw, lion
  c.optimizer.b2 = 0.999
  c.optimizer.layer_decay = 1.0      # < 1: layer-wise lr decay, lr * layer_decay^(depth from the top)

  # Quantization (model_zoo.compression.quantization, through qwix): int weights, and int8 inputs if asked.
  c.quantization = ml_collections.ConfigDict()
  c.quantization.mode = 'none'           # none | ptq (eval.py quantizes the trained float model, as --quantize
  #                                        would with these settings) | qat (fine-tune init_from quantized)
  c.quantization.weight_dtype = 'int8'   # int8 | int4
  c.quantization.act_dtype = 'none'      # none (weights only) | int8 (each input row quantized as it comes)
  c.quantization.calibration = 'absmax'  # absmax (scale = max |w| / 127.5 per channel) | gptq (PTQ, int weights
  #                                        rounded against the inputs of calibration_batches training batches)
  c.quantization.calibration_batches = 8
  c.quantization.tile_size = 0           # dense layers: one scale per this many inputs; 0 = per output channel
  c.quantization.modules = r'(.*/)?block_\d+(/.*)?'  # regex on module paths: by default the blocks' layers

  # Pruning (model_zoo.compression.pruning): weights set to zero by magnitude, once or on a schedule.
  c.pruning = ml_collections.ConfigDict()
  c.pruning.method = 'none'              # none | magnitude (a threshold per tensor) | global_magnitude (one for all)
  c.pruning.sparsity = 0.5               # the final fraction of zeros among the pruned parameters, in [0, 1)
  c.pruning.begin_step = 0               # gradual (Zhu & Gupta, 2017) from begin_step to end_step; equal: once
  c.pruning.end_step = 0                 #   (0 and 0: the initial or init_from weights, then fine-tuned)
  c.pruning.frequency = 100              # steps between two recomputations of the masks
  c.pruning.params = r'(.*/)?(kernel|u)'  # regex on parameter paths: dense/conv kernels, LSTM/GRU's recurrent u

  # Knowledge distillation (model_zoo.compression.distill): learn from a trained teacher's outputs too.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ''                 # '' | a trained workdir (its config.json builds it, its latest checkpoint fills it)
  c.distill.temperature = 2.0            # T: both softmaxes at logits / T (kl)
  c.distill.alpha = 0.5                  # loss = alpha * distance(student, teacher) + (1 - alpha) * the task's loss
  c.distill.distance = 'kl'              # kl (T^2 KL, Hinton et al. 2015) | hard (teacher's top-1 as labels) | mse

  # Interpretation (eval.py --mode=interpret; model_zoo.interpret): attributions of a classifier's class score.
  c.interpret = ml_collections.ConfigDict()
  c.interpret.num_examples = 512         # the first examples of the eval split attributed and measured
  c.interpret.target = 'label'           # label (each example's true class) | predicted | a class index, e.g. '3'
  c.interpret.score = 'logit'            # what is attributed: the target's logit | log_probability
  c.interpret.baseline = ''              # '' the task's first: zeros | mean (images); mask | pad (text)
  c.interpret.steps = 128                # integrated gradients: points of the midpoint Riemann sum
  c.interpret.smoothgrad_samples = 32    # SmoothGrad: noisy copies averaged
  c.interpret.smoothgrad_noise = 0.15    # ... their noise, a share of each input's range (max - min)
  c.interpret.occlusion_window = 2       # occlusion: the side of the square of pixels (tokens in a run) hidden
  c.interpret.deletion_points = 32       # deletion curve: fractions 0, 1/points, ..., 1 of the units deleted
  c.interpret.top_k = 5                  # text: accuracy with the top-k attributed tokens masked
  c.interpret.chunk = 16                 # path points, samples or windows evaluated at once (memory)
  c.interpret.examples_shown = 6         # pictures: this many correct and this many wrong predictions

  # Devices: a mesh over all of them. -1 takes what the other axes leave.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def _check(ok: bool, message: str):
  if not ok:
    raise UserError(message)


def validate(config: ml_collections.ConfigDict):
  """Range checks on the shared keys; names are checked by their registries."""
  for key in ('batch_size', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'max_checkpoints_to_keep', 'grad_accum_steps'):
    value = config[key]
    _check(isinstance(value, int) and value > 0,
           f'config.{key} must be a positive integer, got {value!r}')
  _check(isinstance(config.per_device_batch_size, int) and config.per_device_batch_size >= 0,
         f'config.per_device_batch_size must be an integer >= 0 (0: batch_size split over the devices), got '
         f'{config.per_device_batch_size!r}')
  _check(config.loss_chunks == 0 or config.task == 'language_modeling',
         f'config.loss_chunks={config.loss_chunks!r} applies to language models (config.task=\'language_modeling\'), '
         f'not to config.task={config.task!r}; set it to 0')
  _check(isinstance(config.seed, int) and 0 <= config.seed < 2 ** 32,
         f'config.seed must be an integer in [0, 2**32), got {config.seed!r}')
  _check(config.batch_size % config.grad_accum_steps == 0,
         f'config.batch_size={config.batch_size} must be a multiple of '
         f'config.grad_accum_steps={config.grad_accum_steps}')
  _check(config.freeze in ('none', 'backbone'), f"config.freeze must be 'none' or 'backbone', got {config.freeze!r}")
  _check(config.freeze == 'none' or config.init_from,
         "config.freeze='backbone' freezes pretrained weights: set config.init_from to a workdir or 'hf:<dir>'")
  _check(config.dataset.prefetch >= 0, 'config.dataset.prefetch must be >= 0')
  d = config.distill
  lookup(dict.fromkeys(('kl', 'hard', 'mse')), d.distance, 'distillation distance', 'distill.distance')
  _check(isinstance(d.temperature, (int, float)) and d.temperature > 0,
         f'config.distill.temperature must be > 0, got {d.temperature!r}')
  _check(isinstance(d.alpha, (int, float)) and 0 <= d.alpha <= 1,
         f'config.distill.alpha weighs the teacher against the labels, in [0, 1]; got {d.alpha!r}')


def from_json(path: str) -> ml_collections.ConfigDict:
  """The config a run saved (<workdir>/config.json): lists read back as tuples, and the shared keys
  added to model_zoo since the run started at their defaults (as it ran with them)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  def fill(node, defaults):
    for key, value in defaults.items():
      if key not in node:
        node[key] = value
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value)
  try:
    config = ml_collections.ConfigDict(tuples(json.loads(epath.Path(path).read_text())))
  except (OSError, ValueError) as e:
    raise UserError(f'{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): the config the run '
                    f'was started with is damaged') from e
  fill(config, base_config())
  return config


def lookup(registry: dict, name: str, what: str, key: str):
  """registry[name], or a UserError that lists the known names."""
  if name not in registry:
    raise UserError(f'unknown {what} {name!r} in config.{key}; known: {", ".join(sorted(registry))}')
  return registry[name]


def options(arg: str, config_file: str, **choices) -> dict[str, str]:
  """The `key=value,...` of `--config=<config_file>:<arg>`; each key takes one of `choices[key]`,
  the first being its default. Anything else is a ValueError that lists what is allowed."""
  given = dict(kv.split('=', 1) if '=' in kv else (kv, None) for kv in arg.split(',') if kv)
  chosen = {key: given.pop(key, list(values)[0]) for key, values in choices.items()}
  if given or any(chosen[key] not in values for key, values in choices.items()):
    takes = ' and '.join(f'{key}=one of {", ".join(values)}' for key, values in choices.items())
    raise ValueError(f'{config_file} takes {takes}; got {arg!r}')
  return chosen


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py` or `path.py:arg` (the argument of its `get_config`)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} not found; the configs are in configs/, e.g. --config=configs/mlp.py')
  module = _import(path)
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'{path} has no get_config(): a config file defines get_config() returning a ConfigDict')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except UserError:
    raise
  except (ValueError, TypeError, KeyError) as e:  # as `config.options` raises for a bad argument
    raise UserError(f'{spec}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{spec}: get_config() failed: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'{path}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict')
  return config


def _import(path: str):
  """The module of a config file; one inside a package directory (configs/) is imported as part of it."""
  path = os.path.abspath(path)
  directory, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
  try:
    if os.path.isfile(os.path.join(directory, '__init__.py')):
      package = os.path.basename(directory)
      loaded = sys.modules.get(package)
      if loaded is None or os.path.dirname(os.path.abspath(getattr(loaded, '__file__', '') or '')) != directory:
        spec = importlib.util.spec_from_file_location(package, os.path.join(directory, '__init__.py'),
                                                      submodule_search_locations=[directory])
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[package] = loaded
        spec.loader.exec_module(loaded)
      return importlib.import_module(f'{package}.{stem}')
    spec = importlib.util.spec_from_file_location(f'_model_zoo_config_{stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  except SyntaxError as e:
    raise UserError(f'{path} line {e.lineno}: syntax error: {e.msg}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path} could not be imported: {type(e).__name__}: {e}') from e
