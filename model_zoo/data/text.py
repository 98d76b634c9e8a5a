"""Text for language modelling: tokenizers, corpora by name, and documents packed into rows.

Corpora: `pydoc`, the CPython documentation topics that ship with every Python (offline), and
the TFDS `lm1b` (One Billion Word, one sentence per document; must be on disk or downloaded).

Tokenizers: `bytes` (UTF-8 bytes, nothing to train) or `sentencepiece` (BPE, trained on the
training split once and kept in `<workdir>/tokenizer.model`). Ids 0, 1, 2 are pad, BOS, EOS.
`hf:<dir>` is a Hugging Face checkpoint's tokenizer (model_zoo.transfer.hf), for fine-tuning it.

Packing: every document becomes [BOS] + tokens + [EOS]; the documents of a split, in order,
form one stream cut into rows of `seq_len` + 1 tokens that overlap by one. `weights` is 1
exactly where a target is the next token of the same document, so every real target of a
split is counted once over all rows: evaluation over the rows is exact.
"""
import collections.abc
import hashlib
import io
import itertools
import operator
import os
import tempfile
from typing import Callable, Iterable, Sequence

import ml_collections
import numpy as np

from model_zoo.data import sources
from model_zoo.data.sources import Dataset
from model_zoo.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TOKENIZERS = ('bytes', 'sentencepiece')
# SentencePiece trains on at most this many documents (sentences), a fixed sample of the rest.
MAX_TRAIN_SENTENCES = 2_000_000
# Longest document (in bytes) SentencePiece trains on; longer ones it would skip.
MAX_SENTENCE_BYTES = 1 << 22


class ByteTokenizer:
  """UTF-8 bytes: id = byte + 3. Needs no training; every text encodes."""
  vocab_size = 259
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + 3).tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids_N = np.asarray(ids, np.int64).reshape(-1)
    bytes_N = ids_N[(ids_N >= 3) & (ids_N < self.vocab_size)] - 3
    return bytes_N.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for: 0 for pad/BOS/EOS, 1 for every byte."""
    bytes_V = np.ones(self.vocab_size, np.int32)
    bytes_V[:3] = 0
    return bytes_V


class SentencePieceTokenizer:
  """A SentencePiece model file, trained by `train` (BPE, byte fallback, no normalisation).

  Text is not normalised and no dummy space is prepended, so `decode(encode(t)) == t` for
  every string `t`, and the `token_bytes` of its ids sum to exactly `len(t.encode())`.
  """

  def __init__(self, path: str):
    self.path = path
    with open(path, 'rb') as f:
      self._load(f.read())

  def _load(self, proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    if (self.pad_id, self.bos_id, self.eos_id) != (PAD_ID, BOS_ID, EOS_ID):
      raise UserError(f'SentencePiece model {self.path} has pad/bos/eos ids {self.pad_id}/{self.bos_id}/'
                      f'{self.eos_id}, not {PAD_ID}/{BOS_ID}/{EOS_ID}; delete it so that one is trained, '
                      f'or use a model made by SentencePieceTokenizer.train')

  def __getstate__(self):
    return {'path': self.path, 'proto': self._proto}

  def __setstate__(self, state):
    self.path = state['path']
    self._load(state['proto'])

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, path: str, max_sentences: int = MAX_TRAIN_SENTENCES,
            user_symbols: Sequence[str] = ()) -> 'SentencePieceTokenizer':
    """Trains a BPE model on `texts` (each one sentence to SentencePiece) and saves it to `path`.

    Deterministic: the same texts give a byte-identical file. A corpus of more than
    `max_sentences` texts is sampled here, with a fixed seed, rather than by SentencePiece's
    own `input_sentence_size`/`shuffle_input_sentence`, whose sample differs from one process
    to the next even after `set_random_generator_seed` (sentencepiece 0.2.3).
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sample = _sample(texts, max_sentences)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size, model_type='bpe',
          byte_fallback=True, character_coverage=1.0,
          pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
          normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
          allow_whitespace_only_pieces=True,   # runs of spaces (code indentation) as single pieces
          user_defined_symbols=list(user_symbols),  # such as BERT's <mask>, ids right after unk
          input_sentence_size=0, shuffle_input_sentence=False,  # `sample` is already the sample
          max_sentence_length=MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # 'INTERNAL: src/trainer_interface.cc(744) [check] What went wrong.'
      reason = str(e).strip().splitlines()[-1].split('] ', 1)[-1].rstrip('.')
      raise UserError(f'could not train a SentencePiece tokenizer with vocab_size={vocab_size} on '
                      f'{len(sample)} documents: {reason}. Set config.dataset.vocab_size to fit: at least '
                      f'260 + the number of distinct characters, and a small corpus cannot fill a large '
                      f'vocabulary') from e
    write_atomically(path, model.getvalue())
    return cls(path)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  @property
  def mask_id(self) -> int | None:
    """The id of '<mask>' (BERT's [MASK]) if the model was trained with it, else None."""
    i = self._sp.piece_to_id('<mask>')
    return None if i == UNK_ID else i

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids > EOS_ID) & (ids < self.vocab_size)]
    return self._sp.decode(ids.tolist())

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for: the piece with '▁' as ' '; 1 for a byte piece <0xNN>;
    0 for pad/BOS/EOS/unk."""
    sp = self._sp
    bytes_V = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        bytes_V[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i)):
        bytes_V[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return bytes_V


def _sample(texts: Iterable[str], k: int, seed: int = 0) -> list[str]:
  """At most `k` of `texts`, the same ones every time: a seeded uniform sample."""
  if isinstance(texts, collections.abc.Sequence):
    n = len(texts)
    if n <= k:
      return list(texts)
    keep = np.sort(np.random.default_rng(seed).choice(n, k, replace=False)).tolist()
    return texts.take(keep) if hasattr(texts, 'take') else [texts[i] for i in keep]
  rng, reservoir = np.random.default_rng(seed), []
  for i, text in enumerate(texts):  # reservoir sampling (Algorithm R)
    if i < k:
      reservoir.append(text)
    elif (j := int(rng.integers(i + 1))) < k:
      reservoir[j] = text
  return reservoir


def _temp_path(path: str) -> str:
  """A new empty file next to `path`, to be renamed onto it when complete."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=os.path.basename(path) + '.tmp')
  os.close(fd)
  return tmp


def write_atomically(path: str, data: bytes):
  """Writes `data` to `path` so that a reader sees the whole file or none (several processes may)."""
  tmp = _temp_path(path)
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def tokenizer_for(dataset_config: ml_collections.ConfigDict, workdir: str | None,
                  train_texts: Callable[[], Iterable[str]], user_symbols: Sequence[str] = ()):
  """The tokenizer `dataset_config.tokenizer` names.

  SentencePiece: `<workdir>/tokenizer.model` when it exists (never retrained), else one
  trained on `train_texts()` with `dataset_config.vocab_size` tokens and saved there.
  Without a workdir it is trained into a temporary directory and kept only in memory.
  """
  kind = dataset_config.tokenizer
  if kind == 'bytes':
    return ByteTokenizer()
  if kind.startswith('hf:'):  # a Hugging Face checkpoint's own (config.init_from='hf:<dir>' sets it)
    from model_zoo.transfer import hf  # pylint: disable=g-import-not-at-top
    return hf.HFTokenizer(kind[3:])
  if kind != 'sentencepiece':
    raise UserError(f'unknown tokenizer {kind!r} in config.dataset.tokenizer; known: {", ".join(TOKENIZERS)}')
  vocab_size = dataset_config.vocab_size
  if workdir is None:
    with tempfile.TemporaryDirectory() as tmp:
      return SentencePieceTokenizer.train(train_texts(), vocab_size, os.path.join(tmp, 'tokenizer.model'),
                                          user_symbols=user_symbols)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(path):
    tokenizer = SentencePieceTokenizer(path)
    if tokenizer.vocab_size != vocab_size:
      raise UserError(f'{path} has {tokenizer.vocab_size} tokens but config.dataset.vocab_size={vocab_size}; '
                      f'set --config.dataset.vocab_size={tokenizer.vocab_size} to use it, or use a new '
                      f'--workdir to train a tokenizer of the new size')
    return tokenizer
  os.makedirs(workdir, exist_ok=True)
  return SentencePieceTokenizer.train(train_texts(), vocab_size, path, user_symbols=user_symbols)


# Corpora.

PYDOC_SPLITS = ('train', 'validation')
# lm1b has no validation split: 'validation' reads 'test'.
LM1B_SPLITS = {'train': 'train', 'test': 'test', 'validation': 'test'}


def _pydoc_split(topic: str) -> str:
  """'validation' for about 10% of topic names, by a hash of the name alone, so a topic keeps
  its split across Python versions whatever topics are added or edited. (The 'pydoc/' prefix
  puts 8 of the 79 topics of Python 3.11, 9% of the characters, in validation.)"""
  digest = hashlib.sha256(f'pydoc/{topic}'.encode('utf-8')).digest()
  return 'validation' if int.from_bytes(digest[:8], 'big') % 10 == 0 else 'train'


def _pydoc(split: str) -> list[str]:
  """The topics of the CPython documentation (`pydoc_data.topics`), one document each, by name."""
  if split not in PYDOC_SPLITS:
    raise UserError(f'data set pydoc has no split {split!r}; it has: {", ".join(PYDOC_SPLITS)}')
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [topics[name] for name in sorted(topics) if _pydoc_split(name) == split]


class _TextColumn(collections.abc.Sequence):
  """The 'text' of each example of a TFDS data source, read and decoded on access."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self._read(range(len(self))[i])
    return self._read([range(len(self))[i]])[0]

  def __iter__(self):
    for lo in range(0, len(self), 4096):
      yield from self[lo:lo + 4096]

  def take(self, keys) -> list[str]:
    """The texts at `keys`, read in batches."""
    keys = list(keys)
    return [t for lo in range(0, len(keys), 4096) for t in self._read(keys[lo:lo + 4096])]

  def _read(self, keys) -> list[str]:
    keys = list(keys)
    try:
      examples = self._source.__getitems__(keys) if keys else []
    except TypeError:  # tfds.testing.mock_data's __getitems__ (tfds 4.9.10) cannot be called
      examples = [self._source[k] for k in keys]
    return [_to_str(ex['text']) for ex in examples]


def _to_str(text) -> str:
  text = text.item() if isinstance(text, np.ndarray) else text
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)


def _lm1b_split(split: str) -> str:
  if split not in LM1B_SPLITS:
    raise UserError(f'data set lm1b has no split {split!r}; it has: train, test '
                    f'(and validation, which reads test: lm1b has no validation split)')
  return LM1B_SPLITS[split]


def _lm1b(config: ml_collections.ConfigDict, split: str) -> _TextColumn:
  split = _lm1b_split(split)
  source = sources.tfds_source(config, 'lm1b', split, offline_alternative='pydoc')
  return _TextColumn(source)


CORPORA = {'pydoc': lambda config, split: _pydoc(split), 'lm1b': _lm1b}


def documents(dataset_config: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """The documents of a split, in a fixed order.

  pydoc: a list of str. lm1b: a sequence that reads and decodes on access (30M sentences
  as Python strings would take several GB).
  """
  name = dataset_config.name
  if name not in CORPORA:
    raise UserError(f'unknown text data set {name!r} in config.dataset.name; known: {", ".join(sorted(CORPORA))}')
  return CORPORA[name](dataset_config, split)


# Packing.

def _stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _encode_chunks(docs: Sequence[str], tokenizer, chunk: int = 4096):
  """[BOS] + tokens + [EOS] of each document, in order, as arrays of about `chunk` documents."""
  dtype = _stream_dtype(tokenizer.vocab_size)
  for lo in range(0, len(docs), chunk):
    ids = tokenizer.encode_batch(docs[lo:lo + chunk])
    lengths_D = np.fromiter(map(len, ids), np.int64, len(ids))
    starts_D = np.concatenate([[0], np.cumsum(lengths_D + 2)[:-1]])
    out_N = np.empty(int(lengths_D.sum()) + 2 * len(ids), dtype)
    is_token_N = np.ones(len(out_N), bool)
    is_token_N[starts_D] = is_token_N[starts_D + lengths_D + 1] = False
    out_N[is_token_N] = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths_D.sum()))
    out_N[starts_D] = tokenizer.bos_id
    out_N[starts_D + lengths_D + 1] = tokenizer.eos_id
    yield out_N


def _stream(docs: Sequence[str], tokenizer, cache: str | None) -> np.ndarray:
  """The encoded split; with `cache`, written there once (atomically) and memory-mapped."""
  if cache is None:
    parts = list(_encode_chunks(docs, tokenizer))
    return np.concatenate(parts) if parts else np.zeros(0, _stream_dtype(tokenizer.vocab_size))
  dtype = _stream_dtype(tokenizer.vocab_size)
  raw, tmp = _temp_path(cache), _temp_path(cache)
  try:
    with open(raw, 'wb') as f:  # chunk by chunk: the whole split need not fit in memory
      for part in _encode_chunks(docs, tokenizer):
        part.tofile(f)
    tokens_N = np.memmap(raw, dtype, 'r') if os.path.getsize(raw) else np.zeros(0, dtype)
    with open(tmp, 'wb') as f:
      np.lib.format.write_array(f, tokens_N)
    del tokens_N
    os.replace(tmp, cache)
  finally:
    for path in (raw, tmp):
      if os.path.exists(path):
        os.remove(path)
  return np.load(cache, mmap_mode='r')


def _doc_starts(stream_N: np.ndarray, bos_id: int, chunk: int = 1 << 24) -> np.ndarray:
  """Indices of the BOS tokens (document starts) in the stream, in order."""
  dtype = np.int32 if len(stream_N) < np.iinfo(np.int32).max else np.int64
  parts = [np.flatnonzero(stream_N[lo:lo + chunk] == bos_id).astype(dtype) + dtype(lo)
           for lo in range(0, len(stream_N), chunk)]
  return np.concatenate(parts) if parts else np.zeros(0, dtype)


class PackedRows:
  """Random access to the rows of a token stream; row i covers stream[i*L : i*L + L + 1].

  Holds the stream (uint16 or int32, possibly memory-mapped) and its document starts;
  each example is built on access, every array of shape [L]:
    inputs, targets (int32): the row without its last / first token, pad_id past the end;
    segment_ids (int32): 1, 2, ... for each document in the row, from the row start; 0 on padding;
    positions (int32): index within the document's part of this row (0 at the row start);
    weights (float32): 1 where the target is the next token of the input's document.
  """

  def __init__(self, stream_N: np.ndarray, seq_len: int, bos_id: int = BOS_ID, pad_id: int = PAD_ID):
    self.stream_N, self.seq_len, self.pad_id = stream_N, seq_len, pad_id
    self.doc_starts_D = _doc_starts(stream_N, bos_id)
    self._len = max(0, -(-(len(stream_N) - 1) // seq_len))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    i = operator.index(i)
    if not -self._len <= i < self._len:
      raise IndexError(f'row {i} of {self._len}')
    i %= self._len
    L, N = self.seq_len, len(self.stream_N)
    lo = i * L
    row_R = np.full(L + 1, self.pad_id, np.int32)
    part = self.stream_N[lo:lo + L + 1]
    row_R[:len(part)] = part
    at_L = lo + np.arange(L)                    # stream index of each input
    a, b = np.searchsorted(self.doc_starts_D, [lo + 1, lo + L + 1])
    starts_S = self.doc_starts_D[a:b]           # documents starting after the row's first token
    seg_L = 1 + np.searchsorted(starts_S, at_L, 'right')
    seg_start_L = np.concatenate([[lo], starts_S])[seg_L - 1]
    real_L = at_L < N
    weights_L = (at_L + 1 < N) & ~np.isin(at_L + 1, starts_S)
    return {'inputs': row_R[:L], 'targets': row_R[1:],
            'segment_ids': np.where(real_L, seg_L, 0).astype(np.int32),
            'positions': np.where(real_L, at_L - seg_start_L, 0).astype(np.int32),
            'weights': weights_L.astype(np.float32)}


def load(dataset_config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  """A text data set's split as packed rows of `dataset_config.seq_len` tokens.

  The tokenizer is trained on `dataset_config.train_split`. lm1b's encoded split is cached in
  `<workdir>/tokens-<split>.npy` and reused (then the TFDS files are not read at all).
  """
  seq_len = dataset_config.seq_len
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise UserError(f'config.dataset.seq_len must be a positive integer, got {seq_len!r}')

  def train_texts():
    return documents(dataset_config, dataset_config.train_split)

  cache = None
  if workdir is not None and dataset_config.name == 'lm1b':
    cache = os.path.join(workdir, f'tokens-{_lm1b_split(split)}.npy')
  if cache is not None and os.path.exists(cache):
    tokenizer = tokenizer_for(dataset_config, workdir, train_texts)
    stream_N = np.load(cache, mmap_mode='r')
  else:
    docs = documents(dataset_config, split)  # first: a bad split or absent data fails before training
    tokenizer = tokenizer_for(dataset_config, workdir, train_texts)
    if cache is not None:
      os.makedirs(workdir, exist_ok=True)
    stream_N = _stream(docs, tokenizer, cache)
  source = PackedRows(stream_N, seq_len, tokenizer.bos_id, tokenizer.pad_id)
  return Dataset(source, lambda ex: ex, tokenizer=tokenizer)
