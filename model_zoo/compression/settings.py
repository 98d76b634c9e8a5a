"""The settings of config.quantization and eval.py --quantize, checked from the config alone: what the
training and evaluation drivers need before anything is built (and without importing qwix, which
model_zoo.compression.quantization does when a model is quantized)."""
import re

import ml_collections

from model_zoo.errors import UserError

MODES = ('none', 'ptq', 'qat')
WEIGHT_DTYPES = ('int8', 'int4')
ACT_DTYPES = ('none', 'int8')
CALIBRATIONS = ('absmax', 'gptq')
# eval.py --quantize=SCHEME: the settings each scheme puts into config.quantization.
SCHEMES = {'int8': dict(weight_dtype='int8', act_dtype='none', calibration='absmax'),
           'int8_dynamic': dict(weight_dtype='int8', act_dtype='int8', calibration='absmax'),
           'int4': dict(weight_dtype='int4', act_dtype='none', calibration='absmax'),
           'int4_gptq': dict(weight_dtype='int4', act_dtype='none', calibration='gptq')}
DEFAULT_MODULES = r'(.*/)?block_\d+(/.*)?'

def check(config: ml_collections.ConfigDict):
  """A UserError, from the config alone, for settings that do not go together."""
  q = config.quantization
  for key, choices in (('mode', MODES), ('weight_dtype', WEIGHT_DTYPES), ('act_dtype', ACT_DTYPES),
                       ('calibration', CALIBRATIONS)):
    if q[key] not in choices:
      raise UserError(f'config.quantization.{key}={q[key]!r} is not one of {", ".join(choices)}'
                      + (' (activations are quantized to int8 or not at all)' if key == 'act_dtype' else ''))
  if q.mode == 'qat' and config.model.get('scan_layers', False):
    raise UserError("config.quantization.mode='qat' quantizes the blocks' layers by their paths (block_<i>), which "
                    "config.model.scan_layers=True stacks into one scanned module; train with scan_layers=False "
                    "(init_from reads a scanned checkpoint too)")
  if not isinstance(q.tile_size, int) or q.tile_size < 0:
    raise UserError(f'config.quantization.tile_size must be an integer >= 0 (0: one scale per output channel), '
                    f'got {q.tile_size!r}')
  if not isinstance(q.calibration_batches, int) or q.calibration_batches < 1:
    raise UserError(f'config.quantization.calibration_batches must be a positive integer, got '
                    f'{q.calibration_batches!r}')
  try:
    re.compile(q.modules)
  except (re.error, TypeError) as e:
    raise UserError(f'config.quantization.modules={q.modules!r} is not a regular expression ({e})') from e
  if q.act_dtype != 'none' and q.weight_dtype != 'int8':
    raise UserError(f"config.quantization.act_dtype='{q.act_dtype}' needs weight_dtype='int8' (int8 inputs are "
                    f"multiplied with int8 weights); got weight_dtype={q.weight_dtype!r}")
  if q.calibration == 'gptq' and q.act_dtype != 'none':
    raise UserError("config.quantization.calibration='gptq' rounds weights only: set act_dtype='none'")
  if q.mode == 'qat' and q.calibration == 'gptq':
    raise UserError("config.quantization.calibration='gptq' is a post-training method; QAT (mode='qat') "
                    "learns its weights on the grid: use calibration='absmax'")
  if q.mode == 'qat' and not config.init_from:
    raise UserError("config.quantization.mode='qat' fine-tunes a trained float model: set --config.init_from "
                    "to its work directory (train it first with quantization.mode='none')")


def scheme(q: ml_collections.ConfigDict) -> str:
  """The name of the settings of `config.quantization` (int8, int8_dynamic, int4, int4_gptq, ...)."""
  return q.weight_dtype + ('_dynamic' if q.act_dtype != 'none' else '') + (
      '_gptq' if q.calibration == 'gptq' else '')


def with_scheme(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config` with quantization set to PTQ by scheme `name` (eval.py --quantize)."""
  if name not in SCHEMES:
    raise UserError(f'--quantize={name!r} is not one of {", ".join(SCHEMES)}')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.quantization.update(mode='ptq', **SCHEMES[name])
  check(config)
  return config
