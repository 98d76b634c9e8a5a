"""LSTM and GRU: the cells against their equations in numpy, state resets in packed rows, training,
decoding a step at a time, the command line (sampling included), pixel-row classification, and a
byte-bigram baseline for pydoc, checked by hand (a reference figure; no test here trains long enough to beat it)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import preset, read_metrics, run_cli, tiny_config
from model_zoo import config as config_lib
from model_zoo.errors import UserError
from model_zoo.data import pipeline, registry, text, tokenizers
from model_zoo.inference import sampling
from model_zoo.models import protocol
from model_zoo.models.rnn import RNNLM, Recurrent, RNNClassifier
from model_zoo.tasks import registry as tasks

RNN_TINY = {'model.num_layers': 1, 'model.embed_size': 16, 'model.hidden_size': 32, 'dataset.seq_len': 32,
            'model.dropout_rate': 0.0}


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _lstm_numpy(x_BxTxD, W, U, b):
  """Hochreiter & Schmidhuber (1997) with the forget gate of Gers et al. (2000), gates in the
  order i, f, g, o along the last axis of W [D, 4H], U [H, 4H] and b [4H]."""
  B, T, _ = x_BxTxD.shape
  H = U.shape[0]
  Wi, Wf, Wg, Wo = np.split(W, 4, axis=1)
  Ui, Uf, Ug, Uo = np.split(U, 4, axis=1)
  bi, bf, bg, bo = np.split(b, 4)
  c, h, out = np.zeros((B, H)), np.zeros((B, H)), []
  for t in range(T):
    x = x_BxTxD[:, t]
    i = _sigmoid(x @ Wi + h @ Ui + bi)
    f = _sigmoid(x @ Wf + h @ Uf + bf)
    g = np.tanh(x @ Wg + h @ Ug + bg)
    o = _sigmoid(x @ Wo + h @ Uo + bo)
    c = f * c + i * g
    h = o * np.tanh(c)
    out.append(h)
  return np.stack(out, 1)


def _gru_numpy(x_BxTxD, W, U, b):
  """Cho et al. (2014), eqs. 5-8, gates in the order r, z, n."""
  B, T, _ = x_BxTxD.shape
  H = U.shape[0]
  Wr, Wz, Wn = np.split(W, 3, axis=1)
  Ur, Uz, Un = np.split(U, 3, axis=1)
  br, bz, bn = np.split(b, 3)
  h, out = np.zeros((B, H)), []
  for t in range(T):
    x = x_BxTxD[:, t]
    r = _sigmoid(x @ Wr + h @ Ur + br)
    z = _sigmoid(x @ Wz + h @ Uz + bz)
    n = np.tanh(x @ Wn + (r * h) @ Un + bn)
    h = z * h + (1 - z) * n
    out.append(h)
  return np.stack(out, 1)


@pytest.mark.parametrize('cell, reference', [('lstm', _lstm_numpy), ('gru', _gru_numpy)])
def test_cell_matches_its_equations_in_numpy(cell, reference):
  B, T, D, H = 3, 6, 5, 4
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  layer = Recurrent(cell, H)
  no_reset = jnp.zeros((B, T), bool)
  params = nn.unbox(layer.init(jax.random.key(0), x, no_reset)['params'])
  gates = {'lstm': 4, 'gru': 3}[cell]
  assert params['w']['kernel'].shape == (D, gates * H) and params['u'].shape == (H, gates * H)
  if cell == 'lstm':  # the forget-gate bias starts at 1, the others at 0
    np.testing.assert_array_equal(params['w']['bias'], np.repeat([0.0, 1.0, 0.0, 0.0], H))
  # Random values everywhere, biases included, so that a gate read from the wrong slice shows.
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  got = layer.apply({'params': params}, x, no_reset)
  want = reference(x.astype(np.float64), params['w']['kernel'], params['u'], params['w']['bias'])
  assert got.shape == (B, T, H)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _packed_row(docs, pad_to):
  """Documents packed into one row the way text.PackedRows does: positions restart at 0."""
  tokens = np.concatenate(docs + [np.zeros(pad_to - sum(map(len, docs)), np.int32)])
  positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(pad_to - sum(map(len, docs)))])
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]
                            + [np.zeros(pad_to - sum(map(len, docs)))])
  return tuple(jnp.asarray(a, jnp.int32)[None] for a in (tokens, positions, segments))


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_packed_row_gives_each_document_the_logits_it_has_alone(cell):
  model = RNNLM(vocab_size=11, cell=cell, num_layers=2, embed_size=8, hidden_size=16)
  rng = np.random.default_rng(1)
  docs = [rng.integers(3, 11, n).astype(np.int32) for n in (5, 7, 3)]
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), train=False)['params'])
  tokens, positions, segments = _packed_row(docs, pad_to=18)
  packed = model.apply({'params': params}, tokens, train=False, positions_BxT=positions, segment_ids_BxT=segments)
  assert packed.shape == (1, 18, 11)
  start = 0
  for doc in docs:
    alone = model.apply({'params': params}, jnp.asarray(doc)[None], train=False)
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], rtol=1e-5, atol=1e-5)
    start += len(doc)
  # Without the resets the second document reads the first: the comparison above can fail.
  unreset = model.apply({'params': params}, tokens, train=False)
  assert np.abs(unreset[0, 5:12] - packed[0, 5:12]).max() > 1e-3


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_decoding_a_step_at_a_time_equals_the_full_forward_pass(cell):
  """The decoder mode: a prompt, then one token at a time, from the state kept in the cache."""
  model = RNNLM(vocab_size=13, cell=cell, num_layers=2, embed_size=8, hidden_size=16)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 13)
  params = nn.unbox(model.init(jax.random.key(0), tokens, train=False)['params'])
  full = model.apply({'params': params}, tokens, train=False)
  decoder, cache = model.clone(decode=True), protocol.init_cache(model, tokens)
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  logits = []
  step = jax.jit(lambda cache, t, p: decoder.apply({'params': params, 'cache': cache}, t, train=False,
                                                   positions_BxT=p, mutable=['cache']))
  for start, stop in [(0, 4)] + [(i, i + 1) for i in range(4, 9)]:
    out, variables = step(cache, tokens[:, start:stop], positions[:, start:stop])
    cache = variables['cache']
    logits.append(out)
  np.testing.assert_allclose(jnp.concatenate(logits, 1), full, rtol=1e-5, atol=1e-5)
  # and sampling, greedy, equals the argmax of repeated full passes
  prompt = [1, 5, 7]
  got = sampling.generate(model, params, jnp.array([prompt]), jax.random.key(0), max_new_tokens=5, temperature=0.0)
  want = list(prompt)
  full = jax.jit(lambda t: model.apply({'params': params}, t, train=False))   # causal: padding after is harmless
  for _ in range(5):
    want.append(int(jnp.argmax(full(jnp.array([want + [0] * (8 - len(want))]))[0, len(want) - 1])))
  assert np.asarray(got)[0].tolist() == want[len(prompt):]


def _task_and_state(config, data):
  """The task and a fresh state on one device (the loop's 8-device layout only slows compilation here)."""
  config_lib.validate(config)
  task = tasks.build(config, data.info)
  example = jax.tree.map(lambda x: np.asarray(x)[None], data.source[0])
  return task, nn.unbox(task.init_state(jax.random.key(config.seed), example))


def test_language_model_trains_and_its_gradients_reach_the_recurrent_weights():
  config = tiny_config('lstm', batch_size=16, **{'model.cell': 'gru', 'optimizer.warmup_steps': 1}, **RNN_TINY)
  data = registry.load(config.dataset, 'train', None)
  task, state = _task_and_state(config, data)
  batch = next(pipeline.train_iterator(data, batch_size=16, seed=0))
  grads = jax.grad(lambda p: task.loss_fn(p, {}, batch, jax.random.key(0))[0])(state.params)
  assert float(jnp.abs(grads['rnn']['block_0']['u']).max()) > 0
  step = jax.jit(task.train_step)
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert losses[0] > np.log(259) - 0.5          # starts near a uniform guess over 259 ids
  assert losses[-1] < losses[0] - 0.5, losses


def test_model_flops_count_every_matmul_parameter_once():
  model = RNNLM(vocab_size=259, num_layers=1, embed_size=16, hidden_size=32)
  tokens = jnp.zeros((2, 12), jnp.int32)
  variables = model.init(jax.random.key(0), tokens, train=False)
  e, h, v = 16, 32, 259
  matmul_params = e * 4 * h + h * 4 * h + h * v   # W, U (once a step), the output layer; not the embedding
  assert protocol.flops_per_example(model, variables, tokens) == 6 * matmul_params * 12


def test_train_and_eval_commands_write_bits_per_byte(tmp_path):
  workdir = str(tmp_path)
  args = ['--config=configs/lstm.py', f'--workdir={workdir}', '--config.batch_size=32',
          '--config.num_train_steps=20', '--config.log_every_steps=10', '--config.eval_every_steps=20',
          '--config.checkpoint_every_steps=20', '--config.optimizer.warmup_steps=2',
          *[f'--config.{k}={v}' for k, v in RNN_TINY.items()]]
  run_cli('train.py', *args, check=True)
  run_cli('eval.py', *args, check=True)
  train = [r for r in read_metrics(workdir, drop=()) if r['split'] == 'train']
  assert train[-1]['loss'] < train[0]['loss']
  assert {'tokens_per_sec', 'tflops_per_sec', 'mfu'} <= set(train[-1])
  saved = json.load(open(os.path.join(workdir, 'eval.json')))
  assert saved['step'] == 20
  assert saved['bits_per_byte'] == pytest.approx(saved['nats_per_byte'] / np.log(2))
  assert 0 < saved['bits_per_byte'] < 8   # better than a uniform guess over bytes
  proc = run_cli('eval.py', *args, '--mode=sample', '--prompt=The ', '--max_new_tokens=8', check=True)
  assert "--- prompt: 'The ' (step 20)" in proc.stdout


def test_classifier_reads_image_rows_as_a_sequence():
  model = RNNClassifier(num_classes=10, cell='gru', num_layers=2, hidden_size=16)
  x = np.random.default_rng(2).random((4, 8, 8, 1)).astype(np.float32)
  params = nn.unbox(model.init(jax.random.key(0), x, train=False)['params'])
  assert params['rnn']['block_0']['w']['kernel'].shape == (8, 3 * 16)  # one row of 8 pixels a step
  logits = model.apply({'params': params}, x, train=False)
  assert logits.shape == (4, 10)
  # The last hidden state is read: the last row matters, and so does the order of the rows.
  changed_last = x.copy()
  changed_last[:, -1] = 0
  assert np.abs(model.apply({'params': params}, changed_last, train=False) - logits).max() > 1e-4
  swapped = x[:, ::-1]
  assert np.abs(model.apply({'params': params}, swapped, train=False) - logits).max() > 1e-4


def test_classification_config_learns_digits_from_pixel_rows():
  config = _config('task=classify')
  assert (config.task, config.dataset.name, config.model.name) == ('classification', 'digits', 'rnn_classifier')
  data, test = registry.load(config.dataset, 'train'), registry.load(config.dataset, 'test')
  task, state = _task_and_state(config, data)
  step = jax.jit(task.train_step)
  batches = pipeline.train_iterator(data, batch_size=config.batch_size, seed=0)
  for i in range(60):
    state, _ = step(state, next(batches), jax.random.key(i))
  eval_step = jax.jit(task.eval_step)
  stats = [eval_step(state, b) for b in pipeline.eval_batches(test, batch_size=config.batch_size)]
  stats = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *stats)
  assert stats['confusion'].shape == (10, 10) and stats['count'] == len(test.source)
  assert task.eval_metrics(stats)['accuracy'] > 0.5   # 10 classes: a guess is 0.1


def _config(arg):
  return preset('lstm', arg)


def test_config_variants():
  lstm, gru = _config(''), _config('cell=gru')
  assert (lstm.model.cell, gru.model.cell) == ('lstm', 'gru')
  assert lstm.dataset.tokenizer == 'bytes' and lstm.dataset.vocab_size == tokenizers.ByteTokenizer.vocab_size
  assert lstm.optimizer.grad_clip_norm > 0 and _config('task=classify').optimizer.grad_clip_norm > 0
  for bad in ('cell=rnn', 'task=translate', 'size=big'):
    with pytest.raises(UserError, match='takes cell=one of lstm, gru and task=one of lm, classify'):
      _config(bad)


# The baseline: a byte-bigram count model, interpolated with Witten-Bell smoothing.

def bigram_nats_per_byte(train_docs, eval_docs, vocab_size=259) -> float:
  """Nats per byte of `eval_docs` under p(b | a) = lam_a c(a, b) / c(a) + (1 - lam_a) p1(b), with
  lam_a = c(a) / (c(a) + distinct successors of a) (Witten & Bell, 1991) and p1 the add-one unigram.

  Scored like the language model: each document is [BOS] bytes [EOS], every byte and the EOS is
  predicted from the token before it, and the sum is divided by the document's bytes.
  """
  tok = tokenizers.ByteTokenizer()
  counts_VxV = np.zeros((vocab_size, vocab_size))
  for doc in train_docs:
    ids = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
    np.add.at(counts_VxV, (ids[:-1], ids[1:]), 1)
  unigram_V = (counts_VxV.sum(0) + 1) / (counts_VxV.sum() + vocab_size)
  n_Vx1 = counts_VxV.sum(1, keepdims=True)
  lam_Vx1 = n_Vx1 / np.maximum(n_Vx1 + (counts_VxV > 0).sum(1, keepdims=True), 1)
  p_VxV = lam_Vx1 * counts_VxV / np.maximum(n_Vx1, 1) + (1 - lam_Vx1) * unigram_V
  nats = num_bytes = 0.0
  for doc in eval_docs:
    ids = np.array([tok.bos_id] + tok.encode(doc) + [tok.eos_id])
    nats -= np.log(p_VxV[ids[:-1], ids[1:]]).sum()
    num_bytes += len(doc.encode('utf-8'))
  return nats / num_bytes


def test_bigram_baseline_by_hand_and_on_pydoc():
  # Train 'ab': pairs BOS-a, a-b, b-EOS. Evaluate 'a': BOS->a, a->EOS (1 byte).
  # The unigram counts successors: a, b, EOS once each of 3, so p1 = 2/262 for them, 1/262 otherwise.
  # lam = 1/2 for BOS and a (one successor, seen once). p(a|BOS) = 1/2 + 1/2 * 2/262;
  # p(EOS|a) = 0 + 1/2 * 2/262.
  want = -np.log(0.5 + 0.5 * 2 / 262) - np.log(0.5 * 2 / 262)
  assert bigram_nats_per_byte(['ab'], ['a']) == pytest.approx(want)
  nats = bigram_nats_per_byte(text.pydoc(_config('').dataset, 'train'),
                              text.pydoc(_config('').dataset, 'validation'))
  print(f'byte bigram on pydoc validation: {nats:.4f} nats/byte, {nats / np.log(2):.4f} bits/byte')
  assert 2.3 < nats < 3.0
