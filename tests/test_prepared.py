"""The pre-tokenised corpus (python -m model_zoo.data.prepare, config.dataset.prepared): the same rows as the
corpus tokenized at start-up, read across records and shards, checked against the config, and a run trained
on it equal to one trained on the corpus, killed and resumed included."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from helpers import preset, read_metrics, run_cli, saved_state, xla_flags
from model_zoo.data import packing, prepared, registry, text
from model_zoo.data.base import Files
from model_zoo.errors import UserError

GPT = ['--config=configs/gpt.py', '--config.model.num_layers=1', '--config.model.d_model=32',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.seq_len=32',
       '--config.model.max_len=32', '--config.dataset.tokenizer=bytes', '--config.dataset.vocab_size=259',
       '--config.batch_size=16', '--config.num_train_steps=12', '--config.log_every_steps=2',
       '--config.eval_every_steps=6', '--config.checkpoint_every_steps=4', '--config.optimizer.warmup_steps=1']


def _dataset(name='pydoc', tokenizer='bytes', vocab_size=259, seq_len=64, directory=''):
  d = preset('gpt').dataset
  d.name, d.tokenizer, d.vocab_size, d.seq_len, d.prepared = name, tokenizer, vocab_size, seq_len, directory
  return d


def _prepare(output, d=None, documents=None):
  d = d or _dataset()
  documents = documents or (lambda split: text.pydoc(d, split))
  return prepared.write(str(output), d, documents, ['train', 'validation'], d.name)


@pytest.mark.parametrize('chunk, shard', [(8192, 1 << 26), (7, 50)])
def test_prepared_rows_equal_the_corpus_tokenized_at_start_up(tmp_path, monkeypatch, chunk, shard):
  monkeypatch.setattr(prepared, 'CHUNK', chunk)
  monkeypatch.setattr(prepared, 'SHARD_TOKENS', shard)
  index = _prepare(tmp_path / 'pydoc', _dataset())
  assert index['dataset'] == 'pydoc' and index['chunk'] == chunk and index['python'] == sys.version.split()[0]
  for split in ('train', 'validation'):
    direct = registry.load(_dataset(), split).source
    read = registry.load(_dataset(directory=str(tmp_path / 'pydoc')), split).source
    assert isinstance(read.stream, prepared.Stream) and len(read.stream) == len(direct.stream)
    assert index['splits'][split]['tokens'] == len(direct.stream)
    np.testing.assert_array_equal(read.doc_starts, direct.doc_starts)
    assert len(read) == len(direct)
    for i in [*range(min(len(read), 40)), len(read) - 1]:
      assert all(np.array_equal(read[i][k], direct[i][k]) for k in direct[i]), (split, i)
    rng = np.random.default_rng(0)   # any slice, across records and shards
    for lo, n in zip(rng.integers(0, len(direct.stream), 50), rng.integers(0, 300, 50)):
      np.testing.assert_array_equal(read.stream[int(lo):int(lo + n)], direct.stream[int(lo):int(lo + n)])
  shards = index['splits']['train']['shards']
  assert len(shards) == -(-index['splits']['train']['tokens'] // (shard // chunk * chunk)) and all(
      os.path.exists(tmp_path / 'pydoc' / s) for s in shards)


def test_sentencepiece_corpus_keeps_its_tokenizer_and_checks_the_config(tmp_path):
  d = _dataset(tokenizer='sentencepiece', vocab_size=512)
  _prepare(tmp_path / 'sp', d)
  d.prepared = str(tmp_path / 'sp')
  files = Files(tokenizer=str(tmp_path / 'run' / 'tokenizer.model'),
                new_tokenizer=str(tmp_path / 'staging' / 'tokenizer.model'))   # a directory not made yet
  data = registry.load(d, 'validation', files)
  assert data.tokenizer.vocab_size == 512
  assert (tmp_path / 'staging' / 'tokenizer.model').read_bytes() == (tmp_path / 'sp' / 'tokenizer.model').read_bytes()
  assert os.listdir(tmp_path / 'staging') == ['tokenizer.model']
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'tokenizer.model').write_bytes(b'another')
  with pytest.raises(UserError, match='differs from the tokenizer of config.dataset.prepared'):
    registry.load(d, 'validation', files)
  for change, message in [({'vocab_size': 400}, 'tokenized with vocab_size=512'),
                          ({'tokenizer': 'bytes', 'vocab_size': 512}, "tokenized with tokenizer='sentencepiece'"),
                          ({'name': 'lm1b'}, "holds the data set 'pydoc', not config.dataset.name='lm1b'")]:
    other = _dataset(tokenizer='sentencepiece', vocab_size=512, directory=str(tmp_path / 'sp'))
    for k, v in change.items():
      other[k] = v
    with pytest.raises(UserError, match=message):
      registry.load(other, 'validation')
  with pytest.raises(UserError, match="has no split 'test'"):
    registry.load(_dataset(tokenizer='sentencepiece', vocab_size=512, directory=str(tmp_path / 'sp')), 'test')


def test_lm1b_through_tfds_is_prepared_like_it_is_read(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  d = _dataset(name='lm1b', seq_len=16)
  with tfds.testing.mock_data(num_examples=12):
    index = prepared.write(str(tmp_path / 'lm1b'), d, lambda split: text.lm1b(d, split), ['train', 'validation'],
                           'lm1b')
    direct = registry.load(d, 'validation').source
  assert index['dataset'] == 'lm1b' and index['splits']['validation']['documents'] == 12
  read = registry.load(_dataset(name='lm1b', seq_len=16, directory=str(tmp_path / 'lm1b')), 'validation').source
  assert len(read) == len(direct) and all(np.array_equal(read[i][k], direct[i][k]) for i in range(len(read))
                                          for k in direct[0])


def test_bad_output_input_or_index_is_one_error_and_leaves_nothing(tmp_path):
  _prepare(tmp_path / 'p')
  with pytest.raises(UserError, match='exists; give a new directory'):
    _prepare(tmp_path / 'p')
  with pytest.raises(UserError, match="no split 'x'"):   # a failure mid-way leaves no directory behind
    _prepare(tmp_path / 'q', documents=lambda split: text.pydoc(_dataset(), 'train' if split == 'train' else 'x'))
  assert sorted(os.listdir(tmp_path)) == ['p']
  (tmp_path / 'p' / 'index.json').write_text('{"format": ')
  with pytest.raises(UserError, match='index.json cannot be read'):
    registry.load(_dataset(directory=str(tmp_path / 'p')), 'train')
  with pytest.raises(UserError, match='not a directory of text files'):
    prepared.text_files(str(tmp_path / 'absent'), 'train')
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / 'a.bin').write_bytes(b'\xff\xfe\x00')
  with pytest.raises(UserError, match='is not UTF-8 text'):
    prepared.text_files(str(tmp_path / 'texts'), 'train' if prepared.hash_bucket('text/a.bin', 20) else 'validation')
  with pytest.raises(UserError, match='dataset.name=prepared reads a prepared corpus'):
    registry.load(_dataset(name='prepared'), 'train')


def _train(workdir, *args, kill_at=None):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  env.pop('MODEL_ZOO_KILL_AT', None)
  if kill_at:
    env['MODEL_ZOO_KILL_AT'] = kill_at
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *GPT, f'--workdir={workdir}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_directory_of_text_files_is_prepared_trained_and_resumed_exactly(tmp_path):
  texts = tmp_path / 'texts'
  docs = {f'dir{i % 3}/topic_{i}.txt': body for i, body in enumerate(text.pydoc(_dataset(), 'train'))}
  for path, body in docs.items():
    (texts / path).parent.mkdir(parents=True, exist_ok=True)
    (texts / path).write_text(body, encoding='utf-8')
  proc = run_cli('-m', 'model_zoo.data.prepare', *GPT, f'--input={texts}', f'--output={tmp_path}/corpus')
  assert proc.returncode == 0, proc.stderr
  index = json.loads((tmp_path / 'corpus' / 'index.json').read_text())
  assert index['dataset'] == 'prepared' and index['source'] == f'files:{texts}'
  assert sum(s['documents'] for s in index['splits'].values()) == len(docs)
  corpus = ['--config.dataset.name=prepared', f'--config.dataset.prepared={tmp_path}/corpus']

  reference = _train(tmp_path / 'reference', *corpus)
  assert reference.returncode == 0, reference.stderr
  killed = _train(tmp_path / 'run', *corpus, kill_at='step:10')
  assert killed.returncode == -signal.SIGKILL
  resumed = _train(tmp_path / 'run', *corpus)
  assert resumed.returncode == 0 and re.search(r'resumed from the checkpoint at step [48] ', resumed.stdout), resumed.stdout
  assert read_metrics(tmp_path / 'run') == read_metrics(tmp_path / 'reference')
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, saved_state(tmp_path / 'run', 12), saved_state(tmp_path / 'reference', 12))
  val = [p for p in docs if prepared.hash_bucket(f'text/{p}', 20) == 0]
  assert index['splits']['validation']['documents'] == len(val) > 0


def test_prepare_of_pydoc_by_the_command_line_equals_a_run_on_pydoc(tmp_path):
  proc = run_cli('-m', 'model_zoo.data.prepare', *GPT, f'--output={tmp_path}/pydoc', check=True)
  assert 'train with --config.dataset.prepared=' in proc.stdout
  direct = registry.load(_dataset(seq_len=32), 'train').source
  read = registry.load(_dataset(seq_len=32, directory=str(tmp_path / 'pydoc')), 'train').source
  assert len(read) == len(direct) and all(np.array_equal(read[7][k], direct[7][k]) for k in direct[7])
  bad = run_cli('-m', 'model_zoo.data.prepare', *GPT, '--config.dataset.name=digits', f'--output={tmp_path}/d')
  assert bad.returncode == 1 and 'is not a language-modelling corpus' in bad.stderr
  assert not os.path.exists(tmp_path / 'd')
