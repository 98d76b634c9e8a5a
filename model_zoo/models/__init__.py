"""Models by name: `config.model.name` -> a flax.linen Module class.

The other fields of `config.model` are passed to the class as keyword arguments.
"""
import ml_collections

from model_zoo.config import lookup
from model_zoo.errors import UserError
from model_zoo.models.cnn import CNN
from model_zoo.models.mlp import MLP

MODELS = {'mlp': MLP, 'cnn': CNN}


def build(model_config: ml_collections.ConfigDict, **kwargs):
  """The module named by `model_config.name`, built from its other fields plus `kwargs`."""
  cls = lookup(MODELS, model_config.name, 'model', 'model.name')
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  try:
    return cls(**fields, **kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {model_config.name!r}: {e}') from e
