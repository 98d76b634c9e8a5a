"""Every data set by name: `config.dataset.name` -> its loader, and `load`, the one way to read a split.

A loader is `f(dataset_config, split, files) -> Dataset` (model_zoo.data.base). `digits`, `pydoc`, `stdlib`,
`pydoc_topics`, `pydoc_topic_spans` and `numbers` need no network; the others are read from TFDS
(`tfds.data_source`, ArrayRecord files, no TensorFlow at read time) and must be on disk, or
`config.dataset.download=True`.
"""
import dataclasses

import ml_collections
import numpy as np

from model_zoo.config import lookup
from model_zoo.data import augment as augment_lib
from model_zoo.data import images, text, text_classification, tokenizers, translation
from model_zoo.data.base import Dataset, Files
from model_zoo.errors import UserError

DATASETS = {
    # image classification
    'digits': images.digits,                 # scikit-learn's bundled 8x8 digits, offline
    'mnist': images.tfds_image_classification('mnist'),
    'fashion_mnist': images.tfds_image_classification('fashion_mnist'),
    'cifar10': images.tfds_image_classification('cifar10'),
    # language modelling
    'pydoc': text.language_modeling(text.pydoc),     # the CPython documentation, offline
    # the standard library's .py files (~31 MB), offline; encoded once into the workdir
    'stdlib': text.language_modeling(text.stdlib, cache_name=lambda split: f'stdlib-{split}'),
    # a directory of text files tokenized by python -m model_zoo.data.prepare (config.dataset.prepared)
    'prepared': text.language_modeling(text.no_documents),
    'lm1b': text.language_modeling(text.lm1b, cache_name=lambda split: text.LM1B_SPLITS.get(split, split)),
    # text classification and masked-LM pretraining
    'pydoc_topics': text_classification.text_classification(text_classification.pydoc_topics),
    'pydoc_topic_spans': text_classification.text_classification(text_classification.pydoc_topics, spans=True),
    # glue/sst2's test labels are hidden (-1): evaluate on validation.
    'glue/sst2': text_classification.text_classification(text_classification.tfds_text(
        'glue/sst2', 'sentence', {'train': 'train', 'validation': 'validation'})),
    'imdb_reviews': text_classification.text_classification(text_classification.tfds_text(
        'imdb_reviews', 'text', {'train': 'train', 'test': 'test'})),
    # translation
    'numbers': translation.translation(translation.number_pairs, decode_splits='test,long', bleu_tokenize='char'),
    'wmt14_translate/de-en': translation.translation(translation.wmt_pairs, decode_splits='test', bleu_tokenize='13a'),
    'wmt17_translate/de-en': translation.translation(translation.wmt_pairs, decode_splits='test', bleu_tokenize='13a'),
}
# The data sets whose examples are images [H, W, C] with labels: config.dataset.classes and augment apply.
IMAGE_CLASSIFICATION = ('digits', 'mnist', 'fashion_mnist', 'cifar10')


def check_name(dataset_config: ml_collections.ConfigDict):
  """A UserError now, before anything is read, if config.dataset.name is not a data set."""
  lookup(DATASETS, dataset_config.name, 'data set', 'dataset.name')
  kind = dataset_config.get('tokenizer')
  if kind is not None and not kind.startswith('hf:') and kind not in tokenizers.KINDS:
    raise UserError(f'unknown tokenizer {kind!r} in config.dataset.tokenizer; known: {", ".join(tokenizers.KINDS)}')
  if dataset_config.get('classes', '') and dataset_config.name not in IMAGE_CLASSIFICATION:
    raise UserError(f'config.dataset.classes applies to the image classification data sets '
                    f'({", ".join(IMAGE_CLASSIFICATION)}), not {dataset_config.name!r}; set it to \'\'')


def load(dataset_config: ml_collections.ConfigDict, split: str, files: Files | None = None) -> Dataset:
  """The split of the data set `dataset_config.name` names; `files`: where it keeps what it derives."""
  check_name(dataset_config)
  data = DATASETS[dataset_config.name](dataset_config, split, files)
  augment = augment_lib.build(dataset_config)
  if augment is None:
    return data
  if np.ndim(data.info.example.get('image')) != 3:
    raise UserError(f'config.dataset.augment={dataset_config.augment!r} needs images [H, W, C]; '
                    f'data set {dataset_config.name!r} has none')
  return dataclasses.replace(data, augment=augment)
