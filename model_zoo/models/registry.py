"""Models by name: `config.model.name` -> a flax.linen Module class.

The other fields of `config.model` are passed to the class as keyword arguments. Adding a family
is one model file and its entry here (see the README).

`check` reads the class's field annotations as the contract of its config, before any data is read:
every key must be a field; an `int`, `float` or `Sequence[int]` field takes that type; a `Literal`
field takes one of its choices. Sizes (int fields) are >= 1, or >= 0 where the default is 0 (off,
or "from the data"); the fields every family names alike have one range (RANGES), and attention
heads must divide the width.
"""
import collections.abc
import dataclasses
import difflib
import math
import typing

import ml_collections

from model_zoo.config import lookup
from model_zoo.errors import UserError
from model_zoo.models.autoencoder import Autoencoder
from model_zoo.models.bert import BERT
from model_zoo.models.cnn import CNN
from model_zoo.models.gan import DCGAN
from model_zoo.models.gpt import GPT
from model_zoo.models.mixer import Mixer
from model_zoo.models.mlp import MLP
from model_zoo.models.resnet import ResNet
from model_zoo.models.rnn import RNNClassifier, RNNLM
from model_zoo.models.transformer import Transformer
from model_zoo.models.vae import VAE
from model_zoo.models.vit import ViT

MODELS = {'mlp': MLP, 'cnn': CNN, 'resnet': ResNet, 'vit': ViT, 'mixer': Mixer,
          'rnn_lm': RNNLM, 'rnn_classifier': RNNClassifier,
          'gpt': GPT, 'bert': BERT, 'transformer': Transformer,
          'autoencoder': Autoencoder, 'vae': VAE, 'dcgan': DCGAN}

# (low, high, low included, high included) of the float fields that mean the same in every family.
RANGES = {'dropout_rate': (0, 1, True, False), 'bn_momentum': (0, 1, True, False),
          'ln_epsilon': (0, math.inf, False, False), 'lora_alpha': (0, math.inf, False, False)}
_INTERNAL = ('name', 'parent', 'decode')  # not options: the module's name, its parent, the decoding mode


def _fields(cls) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL}


def check(model_config: ml_collections.ConfigDict):
  """A UserError now, before any data is read, for a config.model its class would not take."""
  name = model_config.name
  cls = lookup(MODELS, name, 'model', 'model.name')
  fields, hints = _fields(cls), typing.get_type_hints(cls)
  for key, value in model_config.items():
    if key == 'name':
      continue
    where = f'config.model.{key}={value!r}'
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1)
      raise UserError(f'config.model.{key} is not an option of model {name!r}'
                      f'{f"; did you mean {close[0]!r}?" if close else ""} (its options: {", ".join(fields)})')
    hint = hints[key]
    if typing.get_origin(hint) is typing.Literal:
      choices = typing.get_args(hint)
      if value not in choices:
        raise UserError(f'{where} is not one of {", ".join(map(repr, choices))} (model {name!r})')
    elif not _matches(value, hint):
      raise UserError(f'{where} is not a valid {_describe(hint)} for model {name!r}')
    elif hint is int or typing.get_origin(hint) is collections.abc.Sequence:
      least = 0 if fields[key].default == 0 else 1
      if any(v < least for v in (value if isinstance(value, (tuple, list)) else [value])):
        raise UserError(f'{where} must be {"sizes" if hint is not int else "an integer"} >= {least} (model {name!r})')
    elif key in RANGES:
      lo, hi, lo_in, hi_in = RANGES[key]
      if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
        raise UserError(f'{where} must be in {"[" if lo_in else "("}{lo}, {hi}{"]" if hi_in else ")"} '
                        f'(model {name!r})')
  _check_heads(model_config, fields, name)


def _check_heads(model_config, fields, name):
  get = lambda key: model_config.get(key, getattr(fields[key], 'default', None) if key in fields else None)
  d, heads, kv = get('d_model'), get('num_heads'), get('num_kv_heads')
  if d is not None and heads is not None and d % heads:
    raise UserError(f'config.model.num_heads={heads} must divide config.model.d_model={d} (model {name!r})')
  if kv and heads % kv:
    raise UserError(f'config.model.num_kv_heads={kv} must divide config.model.num_heads={heads} '
                    f'(grouped-query attention, model {name!r})')


def check_platform(model_config: ml_collections.ConfigDict, platform: str):
  """A UserError for a model option that the devices of this run (`platform`: 'cpu', 'gpu', 'tpu') cannot run."""
  if model_config.get('attention_impl') != 'cudnn':
    return
  if platform != 'gpu':
    raise UserError(f"config.model.attention_impl='cudnn' runs on NVIDIA GPUs, and this run's devices are "
                    f"{platform}; use '' (XLA attention)")
  if model_config.get('dtype', 'float32') == 'float32':
    raise UserError("config.model.attention_impl='cudnn' computes in bfloat16 or float16, but config.model.dtype="
                    "'float32'; set config.model.dtype=bfloat16, or use attention_impl='' (XLA)")


def build(model_config: ml_collections.ConfigDict, **kwargs):
  """The module named by `model_config.name`, built from its other fields plus `kwargs`."""
  check(model_config)
  cls = MODELS[model_config.name]
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  try:
    return cls(**fields, **kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {model_config.name!r}: {e}') from e


def _matches(value, hint) -> bool:
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if typing.get_origin(hint) is collections.abc.Sequence:
    (item,) = typing.get_args(hint)
    return isinstance(value, (tuple, list)) and all(_matches(v, item) for v in value)
  return True


def _describe(hint) -> str:
  return {int: 'integer', float: 'number'}.get(hint) or str(hint).replace('typing.', '')
