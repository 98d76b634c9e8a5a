"""Packing: documents into rows of `seq_len` tokens (language modelling), and (source, target) pairs
into rows of `src_len` + `tgt_len` tokens (translation), with segment ids so that nothing attends
across a document or pair boundary.

Documents (`PackedRows`): every document becomes [BOS] + tokens + [EOS]; the documents of a split,
in order, form one stream cut into rows of `seq_len` + 1 tokens that overlap by one. `weights` is 1
exactly where a target is the next token of the same document (its tokens and its EOS), so every
real target of a split is counted once over all rows: evaluation over the rows is exact. Where one
id is BOS, EOS and padding alike (GPT-2's <|endoftext|>), the special ids of the stream pair up as
(BOS, EOS) of each document, so a document starts at every other one of them.

Pairs (`PackedPairs`): consecutive pairs share a row while both sides fit. Each row:
  src, src_segments, src_positions                                                  [S]
  tgt_in ([BOS] + target), tgt_out (target + [EOS]), tgt_segments, tgt_positions    [T]
Segment ids number the pairs of a row (0 = padding): attention stays inside a pair, and the
decoder's cross-attention reads only its own source. Pairs too long for a row are left out.
"""
import itertools
import operator
import os
from typing import Sequence

import numpy as np

from model_zoo.paths import temp_path
from model_zoo.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from model_zoo.errors import UserError


def _stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _encode_chunks(docs: Sequence[str], tokenizer, chunk: int = 4096):
  """[BOS] + tokens + [EOS] of each document, in order, as arrays of about `chunk` documents."""
  dtype = _stream_dtype(tokenizer.vocab_size)
  for lo in range(0, len(docs), chunk):
    ids = tokenizer.encode_batch(docs[lo:lo + chunk])
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]])
    out = np.empty(int(lengths.sum()) + 2 * len(ids), dtype)
    is_token = np.ones(len(out), bool)
    is_token[starts] = is_token[starts + lengths + 1] = False
    out[is_token] = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    out[starts] = tokenizer.bos_id
    out[starts + lengths + 1] = tokenizer.eos_id
    yield out


def encode_documents(docs: Sequence[str], tokenizer, cache: str | None) -> np.ndarray:
  """The encoded split; with `cache`, written there once (atomically) and memory-mapped."""
  if cache is None:
    parts = list(_encode_chunks(docs, tokenizer))
    return np.concatenate(parts) if parts else np.zeros(0, _stream_dtype(tokenizer.vocab_size))
  dtype = _stream_dtype(tokenizer.vocab_size)
  raw, tmp = temp_path(cache), temp_path(cache)
  try:
    with open(raw, 'wb') as f:  # chunk by chunk: the whole split need not fit in memory
      for part in _encode_chunks(docs, tokenizer):
        part.tofile(f)
    tokens = np.memmap(raw, dtype, 'r') if os.path.getsize(raw) else np.zeros(0, dtype)
    with open(tmp, 'wb') as f:
      np.lib.format.write_array(f, tokens)
    del tokens
    os.replace(tmp, cache)
  finally:
    for path in (raw, tmp):
      if os.path.exists(path):
        os.remove(path)
  return np.load(cache, mmap_mode='r')


def find_doc_starts(stream: np.ndarray, bos_id: int, eos_id: int, chunk: int = 1 << 24) -> np.ndarray:
  """Indices of the documents' BOS tokens (document starts) in the stream, in order."""
  dtype = np.int32 if len(stream) < np.iinfo(np.int32).max else np.int64
  parts = [np.flatnonzero(stream[lo:lo + chunk] == bos_id).astype(dtype) + dtype(lo)
           for lo in range(0, len(stream), chunk)]
  found = np.concatenate(parts) if parts else np.zeros(0, dtype)
  if bos_id != eos_id:
    return found
  # One id for both: BOS, EOS, BOS, EOS, ... and each EOS right before the next BOS.
  if len(found) % 2 or np.any(found[2::2] != found[1:-1:2] + 1) or (len(found) and found[0] != 0):
    raise UserError(f'a document contains the tokenizer\'s BOS/EOS token (id {bos_id}) in its text, so documents '
                    f'cannot be told apart; remove that token from the text')
  return found[0::2]


class PackedRows:
  """Random access to the rows of a token stream; row i covers stream[i*T : i*T + T + 1], T = seq_len.

  Holds the stream (uint16 or int32, possibly memory-mapped, or anything that slices like it: a prepared
  corpus, model_zoo.data.prepared) and its document starts (found in it, or given);
  each example is built on access, every array of shape [T]:
    inputs, targets (int32): the row without its last / first token, pad_id past the end;
    segment_ids (int32): 1, 2, ... for each document in the row, from the row start; 0 on padding;
    positions (int32): index within the document's part of this row (0 at the row start);
    weights (float32): 1 where the target is the next token of the input's document.
  """

  def __init__(self, stream: np.ndarray, seq_len: int, bos_id: int = BOS_ID, pad_id: int = PAD_ID,
               eos_id: int = EOS_ID, doc_starts: np.ndarray | None = None):
    self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
    self.doc_starts = find_doc_starts(stream, bos_id, eos_id) if doc_starts is None else doc_starts
    self._len = max(0, -(-(len(stream) - 1) // seq_len))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    i = operator.index(i)
    if not -self._len <= i < self._len:
      raise IndexError(f'row {i} of {self._len}')
    i %= self._len
    t, n = self.seq_len, len(self.stream)
    lo = i * t
    row = np.full(t + 1, self.pad_id, np.int32)
    part = self.stream[lo:lo + t + 1]
    row[:len(part)] = part
    # Bounds of the starts' own dtype: a list of Python ints would cast the whole array to int64 on each call.
    a, b = np.searchsorted(self.doc_starts, np.array([lo + 1, min(lo + t + 1, n)], self.doc_starts.dtype))
    at = self.doc_starts[a:b] - lo             # documents starting after the row's first token: 1..t
    inside = at[at < t]
    start_T = np.zeros(t, np.int32)            # each input's document start within the row, by a running max
    start_T[inside] = inside
    start_T = np.maximum.accumulate(start_T)
    seg_T = np.ones(t, np.int32)
    seg_T[inside] += 1
    seg_T = np.cumsum(seg_T, dtype=np.int32) - np.arange(t, dtype=np.int32)
    weights_T = np.ones(t, np.float32)
    weights_T[at - 1] = 0                      # the target is the next document's BOS
    real = max(0, min(t, n - lo))              # inputs inside the stream; targets inside it: one fewer
    weights_T[max(0, min(t, n - lo - 1)):] = 0
    positions_T = np.arange(t, dtype=np.int32) - start_T
    seg_T[real:] = positions_T[real:] = 0
    return {'inputs': row[:t], 'targets': row[1:], 'segment_ids': seg_T, 'positions': positions_T,
            'weights': weights_T}


def flatten_ids(token_lists) -> tuple[np.ndarray, np.ndarray]:
  """Token lists as concatenated tokens and offsets: list i is tokens[offsets[i]:offsets[i + 1]]."""
  lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = np.fromiter((t for ids in token_lists for t in ids), np.int32, int(offsets[-1]))
  return tokens, offsets


def _concat(parts) -> tuple[np.ndarray, np.ndarray]:
  """One (tokens, offsets) from several, in order."""
  tokens = np.concatenate([t for t, _ in parts])
  lengths = np.concatenate([np.diff(o) for _, o in parts])
  return tokens, np.concatenate([[0], np.cumsum(lengths)])


def encode_pairs(pairs_: Sequence[tuple[str, str]], tokenizer, chunk: int = 65536):
  """Both sides as (tokens, offsets), encoded a chunk at a time (Python lists of all WMT ids
  would take several GB)."""
  src, tgt = [flatten_ids([])], [flatten_ids([])]
  for lo in range(0, len(pairs_), chunk):
    part = pairs_[lo:lo + chunk]
    src.append(flatten_ids(tokenizer.encode_batch([s for s, _ in part])))
    tgt.append(flatten_ids(tokenizer.encode_batch([t for _, t in part])))
  return _concat(src), _concat(tgt)


class PackedPairs:
  """Random access to rows of packed (source, target) pairs; see the module docstring."""

  def __init__(self, src, tgt, src_len: int, tgt_len: int, *, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID):
    (self.src_tokens, self.src_off), (self.tgt_tokens, self.tgt_off) = src, tgt
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
      src = self.src_tokens[self.src_off[j]:self.src_off[j + 1]]
      tgt = self.tgt_tokens[self.tgt_off[j]:self.tgt_off[j + 1]]
      s, t = len(src), len(tgt) + 1
      out['src'][s_at:s_at + s] = src
      out['tgt_in'][t_at:t_at + t] = np.concatenate([[self.bos_id], tgt])
      out['tgt_out'][t_at:t_at + t] = np.concatenate([tgt, [self.eos_id]])
      out['src_segments'][s_at:s_at + s] = out['tgt_segments'][t_at:t_at + t] = seg
      out['src_positions'][s_at:s_at + s] = np.arange(s)
      out['tgt_positions'][t_at:t_at + t] = np.arange(t)
      s_at, t_at = s_at + s, t_at + t
    return out
