"""Text for language modelling: corpora, tokenized and packed into rows (model_zoo.data.packing).

Corpora: `pydoc`, the CPython documentation topics that ship with every Python (offline),
`stdlib`, the source of the standard library of the Python that runs (offline, ~31 MB), and
the TFDS `lm1b` (One Billion Word, one sentence per document; must be on disk or downloaded).
The tokenizer (model_zoo.data.tokenizers) is trained on the training split. An example is a packed
row: `inputs`, `targets`, `segment_ids`, `positions`, `weights`, each [T].
"""
import io
import os
import sysconfig
import tokenize
from typing import Callable, Sequence

import ml_collections
import numpy as np

from model_zoo import paths
from model_zoo.data import packing, prepared, tokenizers
from model_zoo.data.base import Dataset, Files, LazyColumn, hash_bucket, tfds_source, to_str
from model_zoo.errors import UserError

PYDOC_SPLITS = ('train', 'validation')
# lm1b has no validation split: 'validation' reads 'test'.
LM1B_SPLITS = {'train': 'train', 'test': 'test', 'validation': 'test'}


def pydoc_split(topic: str) -> str:
  """'validation' for about 10% of topic names, by a hash of the name alone, so a topic keeps
  its split across Python versions whatever topics are added or edited. (The 'pydoc/' prefix
  puts 8 of the 79 topics of Python 3.11, 9% of the characters, in validation.)"""
  return 'validation' if hash_bucket(f'pydoc/{topic}', 10) == 0 else 'train'


def pydoc(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """The topics of the CPython documentation (`pydoc_data.topics`), one document each, by name."""
  del config
  if split not in PYDOC_SPLITS:
    raise UserError(f'data set pydoc has no split {split!r}; it has: {", ".join(PYDOC_SPLITS)}')
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [topics[name] for name in sorted(topics) if pydoc_split(name) == split]


STDLIB_SPLITS = ('train', 'validation')
_SKIPPED_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def stdlib_split(path: str) -> str:
  """'validation' for about 5% of the standard library's files, by a hash of the path inside it
  ('json/decoder.py'), so a file keeps its split across Python versions."""
  return 'validation' if hash_bucket(f'stdlib/{path}', 20) == 0 else 'train'


def stdlib_paths(split: str) -> list[str]:
  """The `.py` files of this Python's standard library (tests included; installed packages not) in the
  split, as paths inside it, sorted."""
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for directory, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
    rel = os.path.relpath(directory, root)
    paths += [n if rel == '.' else f'{rel}/{n}'.replace(os.sep, '/') for n in names if n.endswith('.py')]
  return sorted(p for p in paths if stdlib_split(p) == split)


def stdlib(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """The standard library's source files, one document each (~31 MB in 1,790 files for CPython 3.11),
  decoded as Python decodes them (PEP 263), undecodable bytes replaced."""
  del config
  if split not in STDLIB_SPLITS:
    raise UserError(f'data set stdlib has no split {split!r}; it has: {", ".join(STDLIB_SPLITS)}')
  root = sysconfig.get_paths()['stdlib']
  texts = []
  for path in stdlib_paths(split):
    with open(os.path.join(root, path), 'rb') as f:
      data = f.read()
    try:
      encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:   # a test file with a deliberately bad coding line
      encoding = 'utf-8'
    texts.append(data.decode(encoding, errors='replace'))
  return texts


def no_documents(config: ml_collections.ConfigDict, split: str):
  """dataset.name=prepared: the documents are those of config.dataset.prepared, tokenized already."""
  del config, split
  raise UserError('config.dataset.name=prepared reads a prepared corpus: set config.dataset.prepared to a directory '
                  'made by python -m model_zoo.data.prepare --input=<text files> --output=<dir>')


def lm1b(config: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """One Billion Word's sentences, read and decoded on access."""
  if split not in LM1B_SPLITS:
    raise UserError(f'data set lm1b has no split {split!r}; it has: train, test '
                    f'(and validation, which reads test: lm1b has no validation split)')
  source = tfds_source(config, 'lm1b', LM1B_SPLITS[split], offline_alternative='pydoc')
  return LazyColumn(source, lambda ex: to_str(ex['text']))


def language_modeling(documents: Callable[[ml_collections.ConfigDict, str], Sequence[str]],
                      cache_name: Callable[[str], str] | None = None):
  """A loader of packed rows from `documents(config, split)`, the documents of a split in a fixed
  order. With `cache_name` (large corpora), an encoded split is kept in `files.new_encoded(name)`,
  name = cache_name(split), and later runs read it from `files.encoded(name)` without the corpus."""

  def load(config: ml_collections.ConfigDict, split: str, files: Files | None = None) -> Dataset:
    files = files or Files()
    seq_len = config.seq_len
    if not isinstance(seq_len, int) or seq_len <= 0:
      raise UserError(f'config.dataset.seq_len must be a positive integer, got {seq_len!r}')
    if config.get('prepared'):   # tokenized once, offline (python -m model_zoo.data.prepare)
      tokenizer, source = prepared.load(config, split)
      prepared.keep_tokenizer(config, files)
      return Dataset(source, lambda ex: ex, tokenizer=tokenizer)
    train_texts = lambda: documents(config, config.train_split)
    name = cache_name(split) if cache_name else None
    cached = files.encoded(name) if name and files.encoded else None
    if cached is not None and paths.path(cached).exists():
      tokenizer = tokenizers.build(config, files, train_texts)
      stream = paths.load_array(cached)
    else:
      docs = documents(config, split)  # first: a bad split or absent data fails before training a tokenizer
      tokenizer = tokenizers.build(config, files, train_texts)
      stream = packing.encode_documents(docs, tokenizer, files.new_encoded(name) if name and files.new_encoded
                                        else None)
    source = packing.PackedRows(stream, seq_len, tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id)
    return Dataset(source, lambda ex: ex, tokenizer=tokenizer)
  return load

