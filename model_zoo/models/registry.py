"""Models by name: `config.model.name` -> a flax.linen Module class.

The other fields of `config.model` are passed to the class as keyword arguments. Adding a family
is one model file and its entry here (see the README).
"""
import collections.abc
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


def check_name(model_config: ml_collections.ConfigDict):
  """A UserError now, before any data is read, if config.model.name is not a model."""
  lookup(MODELS, model_config.name, 'model', 'model.name')


def build(model_config: ml_collections.ConfigDict, **kwargs):
  """The module named by `model_config.name`, built from its other fields plus `kwargs`."""
  cls = lookup(MODELS, model_config.name, 'model', 'model.name')
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  hints = typing.get_type_hints(cls)
  for key, value in fields.items():
    if key in hints and not _matches(value, hints[key]):
      raise UserError(f'config.model.{key}={value!r} is not a valid {_describe(hints[key])} '
                      f'for model {model_config.name!r}')
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
