"""Tokenizers: UTF-8 bytes, SentencePiece (trained on a run's training split), Hugging Face.

All three share one interface: `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text)`,
`encode_batch(texts)`, `decode(ids)` and `token_bytes()` (the UTF-8 bytes each id stands for, for
bits per byte). Ids 0, 1, 2 are pad, BOS, EOS for ours; a Hugging Face tokenizer keeps its own.
`build` picks one from `config.dataset.tokenizer`: 'bytes', 'sentencepiece' or 'hf:<dir>'.
"""
import collections.abc
import io
import json
import os
import tempfile
from typing import Callable, Iterable, Sequence

import ml_collections
import numpy as np

from model_zoo import paths
from model_zoo.data.base import Files
from model_zoo.errors import UserError
from model_zoo.paths import write_atomically

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
KINDS = ('bytes', 'sentencepiece', 'hf:<directory>')
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
    ids = np.asarray(ids, np.int64).reshape(-1)
    byte_values = ids[(ids >= 3) & (ids < self.vocab_size)] - 3
    return byte_values.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

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
    self._load(paths.path(path).read_bytes())

  def _load(self, proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = proto
    problem = '' if proto else 'the file is empty'
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto) if proto else None
    except RuntimeError as e:
      problem = f'it cannot be parsed ({len(proto)} bytes; {str(e).splitlines()[0]})'
    if problem:
      raise UserError(f'{self.path} is not a usable SentencePiece model: {problem}. A run\'s checkpoints need the '
                      f'exact tokenizer they were trained with: restore the file from a copy; only in a workdir '
                      f'without checkpoints may it be deleted, to be trained again')
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


def build(dataset_config: ml_collections.ConfigDict, files: Files | None, train_texts: Callable[[], Iterable[str]],
          user_symbols: Sequence[str] = ()):
  """The tokenizer `dataset_config.tokenizer` names.

  SentencePiece: `files.tokenizer` when that file exists (never retrained), else one trained on
  `train_texts()` with `dataset_config.vocab_size` tokens and saved to `files.new_tokenizer`
  (without one, trained in a temporary directory and kept in memory only).
  """
  kind = dataset_config.tokenizer
  if kind == 'bytes':
    return ByteTokenizer()
  if kind.startswith('hf:'):  # a Hugging Face checkpoint's own (config.init_from='hf:<dir>' sets it)
    return HFTokenizer(kind[3:])
  if kind != 'sentencepiece':
    raise UserError(f'unknown tokenizer {kind!r} in config.dataset.tokenizer; known: {", ".join(KINDS)}')
  vocab_size = dataset_config.vocab_size
  files = files or Files()
  if files.tokenizer and paths.path(files.tokenizer).exists():
    tokenizer = SentencePieceTokenizer(files.tokenizer)
    if tokenizer.vocab_size != vocab_size:
      raise UserError(f'{files.tokenizer} has {tokenizer.vocab_size} tokens but config.dataset.vocab_size='
                      f'{vocab_size}; set --config.dataset.vocab_size={tokenizer.vocab_size} to use it, or use a '
                      f'new --workdir to train a tokenizer of the new size')
    return tokenizer
  if files.new_tokenizer:
    return SentencePieceTokenizer.train(train_texts(), vocab_size, files.new_tokenizer, user_symbols=user_symbols)
  with tempfile.TemporaryDirectory() as tmp:
    return SentencePieceTokenizer.train(train_texts(), vocab_size, os.path.join(tmp, 'tokenizer.model'),
                                        user_symbols=user_symbols)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'could not read {path}: {e}') from e


class HFTokenizer:
  """A checkpoint directory's tokenizer, with the `tokenizers` library: tokenizer.json, else BERT's
  vocab.txt (WordPiece; do_lower_case etc. from tokenizer_config.json) or GPT-2's vocab.json +
  merges.txt (byte-level BPE). BERT: pad/bos/eos/mask are [PAD]/[CLS]/[SEP]/[MASK]; GPT-2: pad, bos
  and eos are all <|endoftext|> and there is no mask. `encode` adds no special tokens; `decode`
  drops them. Pickles as its directory (grain may copy it to worker processes)."""

  def __init__(self, directory: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
    self.directory = directory
    path = lambda name: os.path.join(directory, name)
    conf = _read_json(path('tokenizer_config.json')) if os.path.exists(path('tokenizer_config.json')) else {}

    def token(key, default):
      value = conf.get(key) or default
      return value.get('content') if isinstance(value, dict) else value

    try:
      if os.path.exists(path('tokenizer.json')):
        tok = tokenizers.Tokenizer.from_file(path('tokenizer.json'))
      elif os.path.exists(path('vocab.txt')):
        tok = tokenizers.Tokenizer(models.WordPiece.from_file(path('vocab.txt'), unk_token=token('unk_token', '[UNK]')))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=conf.get('tokenize_chinese_chars', True),
            strip_accents=conf.get('strip_accents'), lowercase=conf.get('do_lower_case', True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
      elif os.path.exists(path('vocab.json')) and os.path.exists(path('merges.txt')):
        tok = tokenizers.Tokenizer(models.BPE.from_file(path('vocab.json'), path('merges.txt')))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=conf.get('add_prefix_space', False))
        tok.decoder = decoders.ByteLevel()
      else:
        raise UserError(f'{directory} has no tokenizer: expected tokenizer.json, vocab.txt (BERT) or '
                        f'vocab.json + merges.txt (GPT-2)')
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, UserError):
        raise
      raise UserError(f'could not read the tokenizer in {directory}: {e}') from e
    tok.no_padding()
    tok.no_truncation()
    if tok.token_to_id(token('cls_token', '[CLS]')) is not None:  # BERT
      names = {'pad': token('pad_token', '[PAD]'), 'bos': token('cls_token', '[CLS]'),
               'eos': token('sep_token', '[SEP]'), 'mask': token('mask_token', '[MASK]'),
               'unk': token('unk_token', '[UNK]')}
    else:  # GPT-2
      eos = token('eos_token', '<|endoftext|>')
      names = {'pad': eos, 'bos': token('bos_token', eos), 'eos': eos, 'mask': None, 'unk': token('unk_token', eos)}
    tok.add_special_tokens([name for name in names.values() if name])  # marks them special: kept whole, not decoded
    for role, name in names.items():
      if name is not None and tok.token_to_id(name) is None:
        raise UserError(f'the tokenizer in {directory} has no {role} token {name!r}')
      setattr(self, f'{role}_id', None if name is None else tok.token_to_id(name))
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def __getstate__(self):
    return {'directory': self.directory}

  def __setstate__(self, state):
    self.__init__(state['directory'])

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes of each token decoded alone (0 for special tokens), for bits per byte. Exact for
    whole characters; a byte-level token holding part of a multi-byte character counts as 3 (U+FFFD)."""
    texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)
    return np.array([len(t.encode('utf-8')) for t in texts], np.int32)
