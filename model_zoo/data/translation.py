"""Parallel text for translation: data sets by name, a shared SentencePiece vocabulary, packing.

Data sets:
  `numbers` (offline, generated): English number words into German, both sides written by
    num2words: "three hundred and twenty-one" -> "dreihunderteinundzwanzig" (units before tens,
    one compound word). The numbers below 100,000 are split once and for all by a hash of the
    number: 2% test, 1% validation, the rest the training pool. The `long` split holds 1,000
    numbers from 100,000 to 999,999: longer inputs and outputs than training ever shows.
  `wmt14_translate/de-en`, `wmt17_translate/de-en` (tensorflow-datasets).
`dataset.source_lang` and `dataset.target_lang` pick the direction.

Vocabulary: one SentencePiece BPE model for both languages, trained on the training split's
two sides and kept with the run (model_zoo.data.tokenizers).

Packing (model_zoo.data.packing.PackedPairs): consecutive pairs share a row while both sides fit
(`src_len`, `tgt_len`); pairs too long for a row are left out. A Dataset's `raw` holds the split's
(source, target) strings, and its `meta` the splits eval.py translates by default
(`decode_splits`) and the BLEU tokenizer that suits the data set (`bleu_tokenize`).
"""
import functools
from typing import Sequence

import ml_collections
import numpy as np

from model_zoo.data import packing, tokenizers
from model_zoo.data.base import Dataset, Files, LazyColumn, hash_bucket, tfds_source, to_str
from model_zoo.errors import UserError

# numbers: in-distribution range, and the range of the `long` split.
IN_RANGE, LONG_RANGE, LONG_SIZE = 100_000, (100_000, 1_000_000), 1_000
NUMBERS_SPLITS = ('train', 'validation', 'test', 'long')
WMT_SPLITS = ('train', 'validation', 'test')


def _numbers_split(n: int) -> str:
  bucket = hash_bucket(f'numbers/{n}', 100)
  return 'test' if bucket < 2 else 'validation' if bucket == 2 else 'train'


@functools.cache
def _in_range_splits() -> dict[str, tuple[int, ...]]:
  """Every number below IN_RANGE by its split, hashed once per process (a training run reads two splits,
  eval.py three)."""
  splits = {'train': [], 'validation': [], 'test': []}
  for n in range(IN_RANGE):
    splits[_numbers_split(n)].append(n)
  return {k: tuple(v) for k, v in splits.items()}


def numbers(split: str, max_examples: int = 0) -> list[int]:
  """The numbers of a split, in a fixed order; `max_examples` > 0 takes a fixed sample of them."""
  if split not in NUMBERS_SPLITS:
    raise UserError(f'data set numbers has no split {split!r}; it has: {", ".join(NUMBERS_SPLITS)}')
  if split == 'long':
    ns = np.random.default_rng(0).choice(np.arange(*LONG_RANGE), LONG_SIZE, replace=False).tolist()
  else:
    ns = list(_in_range_splits()[split])
  if 0 < max_examples < len(ns):
    keep = np.sort(np.random.default_rng(1).choice(len(ns), max_examples, replace=False))
    ns = [ns[i] for i in keep]
  return ns


def number_pairs(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  """(English, German) number words, or the other way round, by num2words."""
  from num2words import num2words  # pylint: disable=g-import-not-at-top
  langs = (config.source_lang, config.target_lang)
  for lang in langs:
    if lang not in ('en', 'de'):
      raise UserError(f'data set numbers has languages en and de; config.dataset has {lang!r}')
  ns = numbers(split, config.train_examples if split == 'train' else 0)
  return [(num2words(n, lang=langs[0]), num2words(n, lang=langs[1])) for n in ns]


def wmt_pairs(config: ml_collections.ConfigDict, split: str) -> Sequence[tuple[str, str]]:
  """A TFDS WMT split's (source, target) sentences, read and decoded on access."""
  if split not in WMT_SPLITS:
    raise UserError(f'data set {config.name} has no split {split!r}; it has: {", ".join(WMT_SPLITS)}')
  langs = (config.source_lang, config.target_lang)
  if sorted(langs) != ['de', 'en']:
    raise UserError(f'data set {config.name} has languages de and en; config.dataset has {langs}')
  source = tfds_source(config, config.name, split, offline_alternative='numbers')
  return LazyColumn(source, lambda ex: tuple(to_str(ex[lang]) for lang in langs))


def translation(pairs, decode_splits: str, bleu_tokenize: str):
  """A loader of packed rows from `pairs(config, split)`, a split's (source, target) strings in a fixed
  order; `decode_splits` and `bleu_tokenize` go to the Dataset's meta."""

  def load(dataset_config: ml_collections.ConfigDict, split: str, files: Files | None = None) -> Dataset:
    for key in ('src_len', 'tgt_len'):
      if not isinstance(dataset_config[key], int) or dataset_config[key] < 2:
        raise UserError(f'config.dataset.{key} must be an integer >= 2, got {dataset_config[key]!r}')
    split_pairs = pairs(dataset_config, split)  # first: a bad split or absent data fails before training

    def train_texts():
      train = split_pairs if split == dataset_config.train_split else pairs(dataset_config, dataset_config.train_split)
      return _Sides(train)

    tokenizer = tokenizers.build(dataset_config, files, train_texts)
    if len(split_pairs) == 0:
      raise UserError(f'split {split!r} of data set {dataset_config.name!r} is empty')
    source = packing.PackedPairs(*packing.encode_pairs(split_pairs, tokenizer), dataset_config.src_len,
                                 dataset_config.tgt_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                 pad_id=tokenizer.pad_id)
    if source.num_dropped:
      print(f'{dataset_config.name}:{split}: {source.num_dropped} of {len(split_pairs)} pairs are longer than '
            f'src_len={dataset_config.src_len} / tgt_len={dataset_config.tgt_len} tokens and left out of its rows',
            flush=True)
    if len(source) == 0:
      raise UserError(f'no pair of {dataset_config.name}:{split} fits src_len={dataset_config.src_len} and '
                      f'tgt_len={dataset_config.tgt_len} tokens; raise config.dataset.src_len/tgt_len')
    return Dataset(source, lambda ex: ex, tokenizer=tokenizer, raw=split_pairs,
                   meta={'decode_splits': decode_splits, 'bleu_tokenize': bleu_tokenize})
  return load


class _Sides(Sequence):
  """Both sides of the pairs as one sequence of sentences, for training the shared vocabulary."""

  def __init__(self, pairs_):
    self._pairs = pairs_

  def __len__(self):
    return 2 * len(self._pairs)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(len(self))[i]]
    return self._pairs[i // 2][i % 2]

  def __iter__(self):
    for pair in self._pairs:
      yield from pair

  def take(self, keys) -> list[str]:
    """The sentences at `keys`, reading each pair once (in batches where the pairs allow)."""
    keys = list(keys)
    ids = sorted({k // 2 for k in keys})
    read = self._pairs.take(ids) if hasattr(self._pairs, 'take') else [self._pairs[i] for i in ids]
    by_id = dict(zip(ids, read))
    return [by_id[k // 2][k % 2] for k in keys]
