"""Training-time image augmentation, per example, from a numpy Generator that grain derives
from the seed and the example's position in the stream (see pipeline.train_iterator).

  crop:       pad `crop_padding` zero pixels on every side, cut a random window of the original
              size (He et al., 2015, sec. 4.2, for CIFAR-10: 4 pixels, 32x32 crops)
  crop_flip:  the same, then a horizontal flip with probability 1/2 (for natural images; not for
              digits or letters, which a flip turns into other glyphs)
"""
import functools

import ml_collections
import numpy as np

from model_zoo.errors import UserError


def random_crop(image_HxWxC: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  h, w, _ = image_HxWxC.shape
  padded = np.pad(image_HxWxC, ((padding, padding), (padding, padding), (0, 0)))
  dy, dx = rng.integers(0, 2 * padding + 1, size=2)
  return padded[dy:dy + h, dx:dx + w]


def _augment(example: dict, rng: np.random.Generator, *, padding: int, flip: bool) -> dict:
  image = random_crop(example['image'], rng, padding)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {**example, 'image': np.ascontiguousarray(image)}


def build(dataset_config: ml_collections.ConfigDict):
  """The augmentation `dataset_config.augment` names ('' or absent: none), as f(example, rng)."""
  name = dataset_config.get('augment', '')
  if not name:
    return None
  padding = dataset_config.get('crop_padding', 4)
  if name not in ('crop', 'crop_flip'):
    raise UserError(f"unknown augmentation {name!r} in config.dataset.augment; known: '' (none), crop, crop_flip")
  if not isinstance(padding, int) or padding < 0:
    raise UserError(f'config.dataset.crop_padding must be an integer >= 0, got {padding!r}')
  return functools.partial(_augment, padding=padding, flip=name == 'crop_flip')
