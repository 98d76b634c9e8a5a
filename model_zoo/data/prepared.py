"""A pre-tokenised corpus: a language-modelling data set tokenized once, offline, into ArrayRecord shards that
training reads row by row, so no process tokenizes anything at start-up (`python -m model_zoo.data.prepare`).

  <dir>/index.json                 what it holds: the data set, the tokenizer's kind and size, the special ids,
                                   and per split its tokens, documents and shards
  <dir>/tokenizer.model            a SentencePiece tokenizer trained on the train split (if that is the kind)
  <dir>/<split>-NNNNN-of-NNNNN.array_record   the split's token stream ([BOS] doc [EOS] [BOS] doc ...)
                                   in records of CHUNK tokens (uint16, or int32 past 65,536 tokens)
  <dir>/<split>.starts.npy         the stream index of each document's BOS, memory-mapped

A training run points `config.dataset.prepared` at the directory (with the data set's name, or
`dataset.name=prepared` for a directory of text files): rows of `dataset.seq_len` are cut from the stream
when read (model_zoo.data.packing.PackedRows), and each process reads only the rows of its share of each
batch (model_zoo.data.pipeline), a record or two a row. The stream and its rows are those the corpus gives
when tokenized at start-up, so a run trains the same either way, and resumes the same.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from model_zoo.data import packing, tokenizers
from model_zoo.data.base import Files, hash_bucket
from model_zoo.paths import UMASK, temp_path
from model_zoo.errors import UserError

CHUNK = 8192               # tokens a record: a row of 1024 reads one record, or two
SHARD_TOKENS = 1 << 26     # tokens a shard (128 MiB of uint16)
FORMAT = 1


def text_files(directory: str, split: str) -> list[str]:
  """The text documents of a directory of files (every file under it, each one document), split by a hash
  of its path inside the directory: ~5% in validation. Files that are not UTF-8 text are refused."""
  if not os.path.isdir(directory):
    raise UserError(f'--input={directory} is not a directory of text files')
  paths = []
  for parent, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    paths += [os.path.relpath(os.path.join(parent, n), directory) for n in names if not n.startswith('.')]
  chosen = sorted(p for p in paths if ('validation' if hash_bucket(f'text/{p}', 20) == 0 else 'train') == split)
  docs = []
  for path in chosen:
    try:
      with open(os.path.join(directory, path), encoding='utf-8') as f:
        docs.append(f.read())
    except UnicodeDecodeError as e:
      raise UserError(f'{os.path.join(directory, path)} is not UTF-8 text ({e.reason}); remove it from --input') from e
  if not docs:
    raise UserError(f'--input={directory} has no files in its {split} split ({len(paths)} files in all): it needs '
                    f'enough files for both splits (about 1 in 20 goes to validation)')
  return docs


def write(output: str, dataset_config, documents, splits: list[str], source: str) -> dict:
  """Tokenizes `documents(split)` of each split into `output` (made whole, or not at all) -> the index."""
  if os.path.exists(output):
    raise UserError(f'--output={output} exists; give a new directory (a prepared corpus is never overwritten)')
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(output) + '.tmp')
  try:
    files = Files(new_tokenizer=os.path.join(tmp, 'tokenizer.model'))
    first = documents(splits[0])   # first: a bad split or absent data fails before training a tokenizer
    tokenizer = tokenizers.build(dataset_config, files, lambda: first if splits[0] == dataset_config.train_split
                                 else documents(dataset_config.train_split))
    index = {'format': FORMAT, 'dataset': dataset_config.name, 'source': source,
             'tokenizer': dataset_config.tokenizer, 'vocab_size': tokenizer.vocab_size,
             'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id,
             'python': sys.version.split()[0], 'chunk': CHUNK, 'splits': {}}
    for split in splits:
      docs = first if split == splits[0] else documents(split)
      index['splits'][split] = _write_split(tmp, split, packing.encode_documents(docs, tokenizer, None), tokenizer)
      index['splits'][split]['documents'] = len(docs)
      print(f'{split}: {len(docs):,} documents, {index["splits"][split]["tokens"]:,} tokens', flush=True)
    with open(os.path.join(tmp, 'index.json'), 'w') as f:
      json.dump(index, f, indent=2)
    os.chmod(tmp, 0o777 & ~UMASK)   # a plain directory's mode, not mkdtemp's 0700
    os.rename(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return index


def _write_split(directory: str, split: str, stream: np.ndarray, tokenizer) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  starts = packing.find_doc_starts(stream, tokenizer.bos_id, tokenizer.eos_id)
  np.save(os.path.join(directory, f'{split}.starts.npy'), starts)
  per_shard = max(1, SHARD_TOKENS // CHUNK) * CHUNK   # whole records: record r of the split is r of the shards
  num_shards = max(1, -(-len(stream) // per_shard))
  names = [f'{split}-{i:05d}-of-{num_shards:05d}.array_record' for i in range(num_shards)]
  for i, name in enumerate(names):
    writer = ArrayRecordWriter(os.path.join(directory, name), 'group_size:1')
    part = stream[i * per_shard:(i + 1) * per_shard]
    for lo in range(0, len(part), CHUNK):
      writer.write(np.ascontiguousarray(part[lo:lo + CHUNK]).tobytes())
    writer.close()
  return {'tokens': int(len(stream)), 'dtype': str(stream.dtype), 'shards': names}


def read_index(directory: str) -> dict:
  path = os.path.join(directory, 'index.json')
  try:
    with open(path) as f:
      index = json.load(f)
    if index.get('format') != FORMAT or not isinstance(index.get('splits'), dict):
      raise ValueError(f'not a prepared corpus of format {FORMAT}')
  except (OSError, ValueError) as e:
    raise UserError(f'config.dataset.prepared={directory}: {path} cannot be read ({type(e).__name__}: '
                    f'{str(e).splitlines()[0]}); make the directory with python -m model_zoo.data.prepare') from e
  return index


class Stream:
  """The token stream of a split of a prepared corpus as a read-only array: len() and slices, a record or
  two a slice (what PackedRows reads). Pickles as its paths (grain may copy it to worker processes)."""

  def __init__(self, directory: str, split: str, info: dict, chunk: int):
    self.directory, self.split, self.info, self.chunk = directory, split, info, chunk
    self.dtype = np.dtype(info['dtype'])
    self._len = info['tokens']
    self._source = None

  def _records(self):
    if self._source is None:
      from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
      self._source = array_record_data_source.ArrayRecordDataSource(
          [os.path.join(self.directory, name) for name in self.info['shards']])
    return self._source

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def __len__(self):
    return self._len

  def __getitem__(self, key):
    if not isinstance(key, slice) or key.step not in (None, 1):
      raise TypeError('a prepared stream is read in contiguous slices')
    lo, hi, _ = key.indices(self._len)
    if hi <= lo:
      return np.zeros(0, self.dtype)
    first, last = lo // self.chunk, (hi - 1) // self.chunk
    records = self._records()
    parts = [np.frombuffer(records[r], self.dtype) for r in range(first, last + 1)]
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return joined[lo - first * self.chunk:hi - first * self.chunk]


def load(dataset_config, split: str):
  """(the tokenizer, a PackedRows source) of `split` of the prepared corpus `dataset_config.prepared`, after
  checking that it is the data set and tokenizer the config asks for."""
  directory = dataset_config.prepared
  index = read_index(directory)
  name = dataset_config.name
  if name != 'prepared' and index['dataset'] != name:
    raise UserError(f'config.dataset.prepared={directory} holds the data set {index["dataset"]!r}, not '
                    f'config.dataset.name={name!r}; set the name to {index["dataset"]!r} (or prepared)')
  for key in ('tokenizer', 'vocab_size'):
    if index[key] != dataset_config[key]:
      raise UserError(f'config.dataset.prepared={directory} was tokenized with {key}={index[key]!r}, but '
                      f'config.dataset.{key}={dataset_config[key]!r}; set --config.dataset.{key}={index[key]!r}')
  if split not in index['splits']:
    raise UserError(f'config.dataset.prepared={directory} has no split {split!r}; it has: '
                    f'{", ".join(index["splits"])}')
  files = Files(tokenizer=os.path.join(directory, 'tokenizer.model'))
  tokenizer = tokenizers.build(dataset_config, files, lambda: (_ for _ in ()).throw(
      UserError(f'{directory}/tokenizer.model is missing: the prepared corpus is incomplete; prepare it again')))
  stream = Stream(directory, split, index['splits'][split], index['chunk'])
  starts = np.load(os.path.join(directory, f'{split}.starts.npy'), mmap_mode='r')
  source = packing.PackedRows(stream, dataset_config.seq_len, tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id,
                              doc_starts=starts)
  return tokenizer, source


def keep_tokenizer(dataset_config, files: Files):
  """The prepared corpus's tokenizer file, copied into the run's new files (so that eval, export and serving
  find it in the work directory); one already there must be the same file."""
  path = os.path.join(dataset_config.prepared, 'tokenizer.model')
  if dataset_config.tokenizer != 'sentencepiece' or not os.path.exists(path):
    return
  if files.tokenizer and os.path.exists(files.tokenizer):
    with open(path, 'rb') as a, open(files.tokenizer, 'rb') as b:
      if a.read() != b.read():
        raise UserError(f'{files.tokenizer} differs from the tokenizer of config.dataset.prepared='
                        f'{dataset_config.prepared}: this run was not trained on that corpus; use a new --workdir')
  elif files.new_tokenizer and not os.path.exists(files.new_tokenizer):
    tmp = temp_path(files.new_tokenizer)   # (its directory made: a run's staging directory may not exist yet)
    shutil.copyfile(path, tmp)
    os.replace(tmp, files.new_tokenizer)
