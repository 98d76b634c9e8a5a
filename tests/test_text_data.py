"""Text data: tokenizers, the pydoc split, lm1b through TFDS, and packing checked against a naive construction."""
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from model_zoo.config import base_config
from model_zoo.data import packing, pipeline, registry, text, tokenizers
from model_zoo.data.base import Files
from model_zoo.errors import UserError
from model_zoo.workdir import Staging, Workdir

ROOT = __file__.rsplit('/tests/', 1)[0]
UNICODE = 'naïve café — 日本語, emoji 😀, tab\tand  two spaces\n'


def _config(name='pydoc', tokenizer='bytes', vocab_size=259, seq_len=5):
  cfg = base_config().dataset
  cfg.unlock()
  cfg.name, cfg.tokenizer, cfg.vocab_size, cfg.seq_len = name, tokenizer, vocab_size, seq_len
  cfg.eval_split = 'validation'
  return cfg


def registry_docs(cfg, split):
  """The documents of a split of the corpus cfg.name."""
  return {'pydoc': text.pydoc, 'lm1b': text.lm1b}[cfg.name](cfg, split)


def _train_docs():
  return registry_docs(_config(), 'train')


@pytest.fixture(scope='module')
def sp_path(tmp_path_factory):
  return tokenizers.SentencePieceTokenizer.train(_train_docs(), 512, str(tmp_path_factory.mktemp('sp') / 'sp.model')).path


# Tokenizers.

def test_byte_tokenizer_round_trip_and_bytes():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(UNICODE)
  assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == UNICODE
  assert tok.token_bytes()[ids].sum() == len(UNICODE.encode('utf-8'))
  assert list(tok.token_bytes()[:4]) == [0, 0, 0, 1] and tok.token_bytes().dtype == np.int32


def test_sentencepiece_round_trip_and_exact_bytes(sp_path):
  tok = tokenizers.SentencePieceTokenizer(sp_path)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (512, 0, 1, 2)
  bytes_V = tok.token_bytes()
  assert bytes_V.shape == (512,) and list(bytes_V[:4]) == [0, 0, 0, 0]  # pad, bos, eos, unk
  # No dummy space is prepended and nothing is normalised, so the sum is exact, not "+1".
  for doc in registry_docs(_config(), 'validation') + [UNICODE, ' leading space', '']:
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc
    assert bytes_V[ids].sum() == len(doc.encode('utf-8'))
  assert len(tok.encode('the')) == 1 and 3 not in tok.encode(UNICODE)  # unseen characters fall back to bytes


_TRAIN_IN_ANOTHER_PROCESS = '''
import sys
from model_zoo.data import text
from model_zoo.data import tokenizers
docs = text.pydoc(None, "train")
tokenizers.SentencePieceTokenizer.train(docs, 512, sys.argv[1])
tokenizers.SentencePieceTokenizer.train(iter([l for d in docs for l in d.splitlines()]), 400, sys.argv[2], max_sentences=500)
'''


def test_sentencepiece_training_is_deterministic(sp_path, tmp_path):
  # In another process too: SentencePiece's own sampling gave different models in different processes.
  subprocess.run([sys.executable, '-c', _TRAIN_IN_ANOTHER_PROCESS, str(tmp_path / 'a'), str(tmp_path / 'b')],
                 cwd=ROOT, check=True)
  with open(sp_path, 'rb') as f, open(tmp_path / 'a', 'rb') as g:
    assert f.read() == g.read()
  lines = [l for d in _train_docs() for l in d.splitlines()]  # 10k lines, sampled to 500 (reservoir)
  sampled = tokenizers.SentencePieceTokenizer.train(iter(lines), 400, str(tmp_path / 'c'), max_sentences=500)
  assert (tmp_path / 'b').read_bytes() == (tmp_path / 'c').read_bytes() and sampled.vocab_size == 400


def test_tokenizer_is_trained_once_then_reused(tmp_path):
  path = str(tmp_path / 'tokenizer.model')
  cfg = _config(tokenizer='sentencepiece', vocab_size=512)
  tok = tokenizers.build(cfg, Files(tokenizer=path, new_tokenizer=path), _train_docs)
  model = (tmp_path / 'tokenizer.model').read_bytes()
  again = tokenizers.build(cfg, Files(tokenizer=path, new_tokenizer=path), lambda: pytest.fail('retrained'))
  assert again.vocab_size == tok.vocab_size == 512 and (tmp_path / 'tokenizer.model').read_bytes() == model
  cfg.vocab_size = 1024
  with pytest.raises(UserError, match='has 512 tokens but config.dataset.vocab_size=1024'):
    tokenizers.build(cfg, Files(tokenizer=path), _train_docs)
  assert (tmp_path / 'tokenizer.model').read_bytes() == model
  assert isinstance(tokenizers.build(_config(), None, _train_docs), tokenizers.ByteTokenizer)
  cfg.tokenizer = 'wordpiece'
  with pytest.raises(UserError, match='unknown tokenizer .*known: bytes, sentencepiece'):
    tokenizers.build(cfg, None, _train_docs)
  cfg.tokenizer, cfg.vocab_size = 'sentencepiece', 100
  with pytest.raises(UserError, match='vocab_size=100'):
    tokenizers.build(cfg, None, _train_docs)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['tokenizer.model']  # no temporary file left


# Corpora.

def test_pydoc_split_is_disjoint_complete_and_stable(capsys):
  from pydoc_data.topics import topics
  train, val = registry_docs(_config(), 'train'), registry_docs(_config(), 'validation')
  assert sorted(train + val) == sorted(topics.values())
  assert 0.05 <= len(val) / len(topics) <= 0.20
  assert val == sorted(val, key={doc: n for n, doc in topics.items()}.get)  # in order of name
  # The split is a function of the name alone (not of Python's salted hash()).
  assert text.pydoc_split('with') == text.pydoc_split('numbers') == 'validation'
  assert text.pydoc_split('if') == text.pydoc_split('lambda') == 'train'
  assert capsys.readouterr().out == ''
  with pytest.raises(UserError, match="no split 'test'; it has: train, validation"):
    registry_docs(_config(), 'test')


def test_stdlib_split_is_disjoint_complete_by_path_and_decoded_as_python_does():
  import sysconfig
  root = sysconfig.get_paths()['stdlib']
  train, val = text.stdlib_paths('train'), text.stdlib_paths('validation')
  assert not set(train) & set(val) and train == sorted(train)
  assert {'json/decoder.py', 'os.py', 'collections/__init__.py'} <= set(train) and 'csv.py' in val
  assert not any('site-packages' in p or '__pycache__' in p for p in train + val)
  assert 0.02 <= len(val) / len(train + val) <= 0.10 and len(train + val) > 500
  docs = text.stdlib(_config('stdlib'), 'validation')
  assert len(docs) == len(val) and sum(map(len, docs)) > 10 ** 6
  with open(f'{root}/csv.py', encoding='utf-8') as f:
    assert docs[val.index('csv.py')] == f.read()
  with pytest.raises(UserError, match="stdlib has no split 'test'; it has: train, validation"):
    text.stdlib(_config('stdlib'), 'test')
  data = registry.load(_config('stdlib', seq_len=256), 'validation')   # bytes: every byte of the split a target
  assert int(np.asarray(data.source.stream).size) == sum(len(d.encode()) + 2 for d in docs)


# Packing.

def _naive_rows(docs, L):
  """Rows built one token at a time from which document each stream position belongs to."""
  tok = tokenizers.ByteTokenizer()
  stream, doc_of = [], []
  for d, doc in enumerate(docs):
    ids = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    stream += ids
    doc_of += [d] * len(ids)
  rows = []
  for i in range(-(-(len(stream) - 1) // L)):
    row = {k: [] for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}
    for k in range(L):
      g = i * L + k
      real, real_target = g < len(stream), g + 1 < len(stream)
      row['inputs'].append(stream[g] if real else 0)
      row['targets'].append(stream[g + 1] if real_target else 0)
      row['segment_ids'].append(len(set(doc_of[i * L:g + 1])) if real else 0)
      row['positions'].append(g - max(i * L, doc_of.index(doc_of[g])) if real else 0)
      row['weights'].append(float(real_target and doc_of[g + 1] == doc_of[g]))
    rows.append(row)
  return stream, rows


def test_packing_matches_naive_construction():
  docs = ['ab', 'cde', '', 'fghijklmn']  # stream of 4 + 5 + 2 + 11 = 22 tokens
  source = packing.PackedRows(packing.encode_documents(docs, tokenizers.ByteTokenizer(), None), 5)
  stream, expected = _naive_rows(docs, 5)
  assert len(stream) == 22 and len(source) == len(expected) == 5  # 21 targets in rows of 5: last row padded
  a, b, c = (ord(ch) + 3 for ch in 'abc')
  row0 = source[0]  # written out by hand: [BOS a b EOS] [BOS c ...
  assert row0['inputs'].tolist() == [1, a, b, 2, 1] and row0['targets'].tolist() == [a, b, 2, 1, c]
  assert row0['segment_ids'].tolist() == [1, 1, 1, 1, 2] and row0['positions'].tolist() == [0, 1, 2, 3, 0]
  assert row0['weights'].tolist() == [1, 1, 1, 0, 1]
  assert source[1]['positions'].tolist() == [0, 1, 2, 3, 0]  # 'cde' continues: positions restart at the row
  for i, want in enumerate(expected):
    got = source[i]
    for key, values in want.items():
      assert got[key].shape == (5,) and got[key].dtype == (np.float32 if key == 'weights' else np.int32)
      assert got[key].tolist() == values, (i, key)
  assert source[-1]['inputs'].tolist() == source[4]['inputs'].tolist() == [ord('n') + 3, 2, 0, 0, 0]
  with pytest.raises(IndexError):
    source[5]
  # Every real target once: all stream positions but the first of each document (its BOS).
  weights = sum(source[i]['weights'].sum() for i in range(len(source)))
  assert weights == len(stream) - len(docs) == sum(len(doc) + 1 for doc in docs) == 18


@pytest.mark.parametrize('seed', range(4))
def test_packing_of_random_documents_matches_naive_construction(seed):
  rng = np.random.default_rng(seed)
  docs = [''.join(rng.choice(list('abcdef'), size=n)) for n in rng.integers(0, 12, size=int(rng.integers(1, 9)))]
  length = int(rng.integers(1, 9))
  source = packing.PackedRows(packing.encode_documents(docs, tokenizers.ByteTokenizer(), None), length)
  _, expected = _naive_rows(docs, length)
  assert len(source) == len(expected)
  for i, want in enumerate(expected):
    got = source[i]
    assert {k: got[k].tolist() for k in want} == want, (seed, i)


def test_loaded_pydoc_evaluates_every_target_once():
  cfg = _config(seq_len=64)
  data = registry.load(cfg, 'validation')
  docs = registry_docs(cfg, 'validation')
  assert isinstance(data.tokenizer, tokenizers.ByteTokenizer) and data.preprocess(data.source[0]) is not None
  assert data.source.stream.dtype == np.uint16
  total, weight_sum = 0.0, 0.0
  for batch in pipeline.eval_batches(data, batch_size=16):
    weight_sum += float((batch['weights'] * batch['mask'][:, None]).sum())
    total += float((data.tokenizer.token_bytes()[batch['targets']] * batch['weights'] * batch['mask'][:, None]).sum())
  assert weight_sum == sum(len(doc.encode()) + 1 for doc in docs)
  assert total == sum(len(doc.encode()) for doc in docs)  # the byte count of bits per byte is exact
  batch = next(pipeline.train_iterator(data, batch_size=4, seed=0))
  assert batch['inputs'].shape == batch['weights'].shape == (4, 64) and batch['positions'].dtype == np.int32


# lm1b.

def test_lm1b_mock_data_is_read_encoded_and_cached(tmp_path):
  cfg = _config(name='lm1b', seq_len=16)
  workdir = Workdir(str(tmp_path / 'run'))
  with tfds.testing.mock_data(num_examples=12):
    docs = list(registry_docs(cfg, 'validation'))  # lm1b has no validation split: it reads test
    with Staging(workdir) as staging:
      data = registry.load(cfg, 'validation', workdir.data_files(staging))
      assert not (tmp_path / 'run').exists()   # written to the staging directory only
      staging.commit()
    with pytest.raises(UserError, match="lm1b has no split 'dev'"):
      registry_docs(cfg, 'dev')
  assert len(docs) == 12 and all(isinstance(d, str) and d for d in docs)
  stream = np.load(tmp_path / 'run' / 'tokens-test.npy')
  expected = np.concatenate([[1] + tokenizers.ByteTokenizer().encode(d) + [2] for d in docs])
  np.testing.assert_array_equal(stream, expected)
  cached = registry.load(cfg, 'test', workdir.data_files())  # no TFDS now: the cache alone
  assert len(cached.source) == len(data.source) == -(-(len(stream) - 1) // 16)
  for i in range(len(data.source)):
    for key, value in data.source[i].items():
      np.testing.assert_array_equal(cached.source[i][key], value)


def test_absent_lm1b_fails_fast_with_advice(tmp_path):
  cfg = _config(name='lm1b', tokenizer='sentencepiece', vocab_size=512)
  cfg.data_dir = str(tmp_path / 'tfds')
  start = time.time()
  with pytest.raises(UserError, match='not available offline.*download=True.*pip install'):
    registry.load(cfg, 'train', Workdir(str(tmp_path / 'run')).data_files())
  assert time.time() - start < 30
  assert not (tmp_path / 'run').exists()
