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
two sides and kept in `<workdir>/tokenizer.model` (see model_zoo.data.text).

Packing: consecutive pairs share a row while both sides fit (`src_len`, `tgt_len`). Each row:
  src, src_segments, src_positions                       [src_len]
  tgt_in ([BOS] + target), tgt_out (target + [EOS]), tgt_segments, tgt_positions   [tgt_len]
Segment ids number the pairs of a row (0 = padding): attention stays inside a pair, and the
decoder's cross-attention reads only its own source. Pairs too long for a row are left out.
"""
import hashlib
from typing import Sequence

import ml_collections
import numpy as np

from model_zoo.data import sources, text
from model_zoo.data.sources import Dataset
from model_zoo.errors import UserError

# numbers: in-distribution range, and the range of the `long` split.
IN_RANGE, LONG_RANGE, LONG_SIZE = 100_000, (100_000, 1_000_000), 1_000
NUMBERS_SPLITS = ('train', 'validation', 'test', 'long')
WMT = ('wmt14_translate/de-en', 'wmt17_translate/de-en')
WMT_SPLITS = ('train', 'validation', 'test')


def decode_splits(dataset_name: str) -> str:
  """The splits eval.py translates by default."""
  return 'test,long' if dataset_name == 'numbers' else 'test'


def bleu_tokenize(dataset_name: str) -> str:
  """sacrebleu's tokenizer for a data set: characters for one-word German numbers, else 13a."""
  return 'char' if dataset_name == 'numbers' else '13a'


def _numbers_split(n: int) -> str:
  bucket = int.from_bytes(hashlib.sha256(f'numbers/{n}'.encode()).digest()[:8], 'big') % 100
  return 'test' if bucket < 2 else 'validation' if bucket == 2 else 'train'


def numbers(split: str, max_examples: int = 0) -> list[int]:
  """The numbers of a split, in a fixed order; `max_examples` > 0 takes a fixed sample of them."""
  if split not in NUMBERS_SPLITS:
    raise UserError(f'data set numbers has no split {split!r}; it has: {", ".join(NUMBERS_SPLITS)}')
  if split == 'long':
    ns = np.random.default_rng(0).choice(np.arange(*LONG_RANGE), LONG_SIZE, replace=False).tolist()
  else:
    ns = [n for n in range(IN_RANGE) if _numbers_split(n) == split]
  if 0 < max_examples < len(ns):
    keep = np.sort(np.random.default_rng(1).choice(len(ns), max_examples, replace=False))
    ns = [ns[i] for i in keep]
  return ns


def _number_pairs(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  from num2words import num2words  # pylint: disable=g-import-not-at-top
  langs = (config.source_lang, config.target_lang)
  for lang in langs:
    if lang not in ('en', 'de'):
      raise UserError(f'data set numbers has languages en and de; config.dataset has {lang!r}')
  ns = numbers(split, config.train_examples if split == 'train' else 0)
  return [(num2words(n, lang=langs[0]), num2words(n, lang=langs[1])) for n in ns]


class _TfdsPairs(Sequence):
  """(source, target) strings of a TFDS translation split, read and decoded on access."""

  def __init__(self, source, langs):
    self._source, self._langs = source, langs

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      keys = list(range(len(self))[i])
      try:
        examples = self._source.__getitems__(keys) if keys else []
      except TypeError:  # tfds.testing.mock_data's __getitems__ cannot be called (tfds 4.9.10)
        examples = [self._source[k] for k in keys]
      return [tuple(text._to_str(ex[lang]) for lang in self._langs) for ex in examples]
    return self[i:i + 1][0] if i >= 0 else self[len(self) + i]

  def __iter__(self):
    for lo in range(0, len(self), 4096):
      yield from self[lo:lo + 4096]

  def take(self, keys) -> list[tuple[str, str]]:
    keys = list(keys)
    out = []
    for lo in range(0, len(keys), 4096):
      try:
        out += [tuple(text._to_str(ex[lang]) for lang in self._langs)
                for ex in self._source.__getitems__(keys[lo:lo + 4096])]
      except TypeError:
        out += [self[k] for k in keys[lo:lo + 4096]]
    return out


def _wmt_pairs(config: ml_collections.ConfigDict, split: str) -> Sequence[tuple[str, str]]:
  if split not in WMT_SPLITS:
    raise UserError(f'data set {config.name} has no split {split!r}; it has: {", ".join(WMT_SPLITS)}')
  langs = (config.source_lang, config.target_lang)
  if sorted(langs) != ['de', 'en']:
    raise UserError(f'data set {config.name} has languages de and en; config.dataset has {langs}')
  return _TfdsPairs(sources.tfds_source(config, config.name, split, offline_alternative='numbers'), langs)


def pairs(dataset_config: ml_collections.ConfigDict, split: str) -> Sequence[tuple[str, str]]:
  """(source, target) sentences of a split, in a fixed order."""
  if dataset_config.name == 'numbers':
    return _number_pairs(dataset_config, split)
  return _wmt_pairs(dataset_config, split)


def _flat(token_lists) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated tokens and offsets: sequence i is tokens[offsets[i]:offsets[i + 1]]."""
  lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.fromiter((t for ids in token_lists for t in ids), np.int32, int(offsets[-1]))
  return tokens, offsets


def _concat(parts) -> tuple[np.ndarray, np.ndarray]:
  """One (tokens, offsets) from several, in order."""
  tokens = np.concatenate([t for t, _ in parts])
  lengths = np.concatenate([np.diff(o) for _, o in parts])
  return tokens, np.concatenate([[0], np.cumsum(lengths)])


def _encode(pairs_: Sequence[tuple[str, str]], tokenizer, chunk: int = 65536):
  """Both sides as (tokens, offsets), encoded a chunk at a time (Python lists of all WMT ids
  would take several GB)."""
  src, tgt = [_flat([])], [_flat([])]
  for lo in range(0, len(pairs_), chunk):
    part = pairs_[lo:lo + chunk]
    src.append(_flat(tokenizer.encode_batch([s for s, _ in part])))
    tgt.append(_flat(tokenizer.encode_batch([t for _, t in part])))
  return _concat(src), _concat(tgt)


class PackedPairs:
  """Random access to rows of packed (source, target) pairs; see the module docstring."""

  def __init__(self, src, tgt, src_len: int, tgt_len: int, *, bos_id=text.BOS_ID, eos_id=text.EOS_ID,
               pad_id=text.PAD_ID):
    (self.src_N, self.src_off), (self.tgt_N, self.tgt_off) = src, tgt
    self.src_len, self.tgt_len = src_len, tgt_len
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    src_lens, tgt_lens = np.diff(self.src_off), np.diff(self.tgt_off) + 1  # + BOS / EOS
    self.kept = np.flatnonzero((src_lens <= src_len) & (tgt_lens <= tgt_len) & (src_lens > 0))
    # Greedy packing in order: row r holds kept pairs [row_starts[r], row_starts[r + 1]).
    starts, s_used, t_used = [], src_len, tgt_len
    for j, (s, t) in enumerate(zip(src_lens[self.kept].tolist(), tgt_lens[self.kept].tolist())):
      if s_used + s > src_len or t_used + t > tgt_len:
        starts.append(j)
        s_used, t_used = 0, 0
      s_used, t_used = s_used + s, t_used + t
    self.row_starts = np.array(starts + [len(self.kept)], np.int64)

  @property
  def num_dropped(self) -> int:
    return len(self.src_off) - 1 - len(self.kept)

  def __len__(self):
    return len(self.row_starts) - 1

  def __getitem__(self, r):
    if not -len(self) <= r < len(self):
      raise IndexError(f'row {r} of {len(self)}')
    r %= len(self)
    out = {k: np.zeros(self.src_len, np.int32) for k in ('src', 'src_segments', 'src_positions')}
    out.update({k: np.zeros(self.tgt_len, np.int32)
                for k in ('tgt_in', 'tgt_out', 'tgt_segments', 'tgt_positions')})
    out['src'][:] = out['tgt_in'][:] = out['tgt_out'][:] = self.pad_id
    s_at = t_at = 0
    for seg, j in enumerate(self.kept[self.row_starts[r]:self.row_starts[r + 1]], start=1):
      src = self.src_N[self.src_off[j]:self.src_off[j + 1]]
      tgt = self.tgt_N[self.tgt_off[j]:self.tgt_off[j + 1]]
      s, t = len(src), len(tgt) + 1
      out['src'][s_at:s_at + s] = src
      out['tgt_in'][t_at:t_at + t] = np.concatenate([[self.bos_id], tgt])
      out['tgt_out'][t_at:t_at + t] = np.concatenate([tgt, [self.eos_id]])
      out['src_segments'][s_at:s_at + s] = out['tgt_segments'][t_at:t_at + t] = seg
      out['src_positions'][s_at:s_at + s] = np.arange(s)
      out['tgt_positions'][t_at:t_at + t] = np.arange(t)
      s_at, t_at = s_at + s, t_at + t
    return out


def load(dataset_config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  """A translation split as packed rows; `Dataset.raw` holds its (source, target) strings."""
  for key in ('src_len', 'tgt_len'):
    if not isinstance(dataset_config[key], int) or dataset_config[key] < 2:
      raise UserError(f'config.dataset.{key} must be an integer >= 2, got {dataset_config[key]!r}')
  split_pairs = pairs(dataset_config, split)  # first: a bad split or absent data fails before training

  def train_texts():
    train = split_pairs if split == dataset_config.train_split else pairs(dataset_config, dataset_config.train_split)
    return _Sides(train)

  tokenizer = text.tokenizer_for(dataset_config, workdir, train_texts)
  if len(split_pairs) == 0:
    raise UserError(f'split {split!r} of data set {dataset_config.name!r} is empty')
  source = PackedPairs(*_encode(split_pairs, tokenizer), dataset_config.src_len, dataset_config.tgt_len,
                       bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  if source.num_dropped:
    print(f'{dataset_config.name}:{split}: {source.num_dropped} of {len(split_pairs)} pairs are longer than '
          f'src_len={dataset_config.src_len} / tgt_len={dataset_config.tgt_len} tokens and left out of its rows',
          flush=True)
  if len(source) == 0:
    raise UserError(f'no pair of {dataset_config.name}:{split} fits src_len={dataset_config.src_len} and '
                    f'tgt_len={dataset_config.tgt_len} tokens; raise config.dataset.src_len/tgt_len')
  return Dataset(source, lambda ex: ex, tokenizer=tokenizer, raw=split_pairs)


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
