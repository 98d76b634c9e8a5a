"""The translation Transformer: data, model against references, decoding, the task, the commands."""
import itertools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_cli, tiny_config
from model_zoo.data import packing, registry, translation
from model_zoo.data.base import Files
from model_zoo.errors import UserError
from model_zoo.inference import beam_search
from model_zoo.models.protocol import init_cache
from model_zoo.models.transformer import Transformer
from model_zoo.tasks import translation as translation_task

PAD, BOS, EOS = 0, 1, 2


def _model(vocab=7, **kw):
  defaults = dict(vocab_size=vocab, num_encoder_layers=2, num_decoder_layers=2, d_model=16, num_heads=2, d_ff=32,
                  dropout_rate=0.0)
  return Transformer(**{**defaults, **kw})


def _params(model, seed=0):
  src, tgt = jnp.ones((1, 5), jnp.int32), jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(seed), src, tgt, train=False)['params'])
  # Larger random weights than the init: sharper distributions, so decoding choices matter.
  return jax.tree.map(lambda p: p * 3.0, params)


def test_numbers_splits_are_fixed_disjoint_and_long_is_longer():
  test, val = translation.numbers('test'), translation.numbers('validation')
  train = translation.numbers('train')
  assert not set(test) & set(train) and not set(val) & set(train) and not set(test) & set(val)
  assert len(test) + len(val) + len(train) == translation.IN_RANGE
  assert 1800 < len(test) < 2200 and 800 < len(val) < 1200
  assert translation.numbers('test') == test  # fixed
  long = translation.numbers('long')
  assert len(long) == 1000 and min(long) >= 100_000 and max(long) < 1_000_000
  sample = translation.numbers('train', 500)
  assert len(sample) == 500 and set(sample) <= set(train) and sample == translation.numbers('train', 500)
  cfg = tiny_config('transformer').dataset
  pairs = dict(zip(translation.numbers('long'), translation.number_pairs(cfg, 'long')))
  n = long[0]
  from num2words import num2words  # pylint: disable=g-import-not-at-top
  assert pairs[n] == (num2words(n, lang='en'), num2words(n, lang='de'))
  with pytest.raises(UserError, match="numbers has no split 'dev'"):
    translation.numbers('dev')


def test_packed_pairs_hold_every_pair_once_with_bos_eos_segments_positions():
  src = [[5, 6, 7], [8], [9, 9, 9, 9, 9, 9], [4, 4], [3]]   # the third is too long for src_len=4
  tgt = [[10, 11], [12, 13, 14], [15], [16], [17, 18]]
  rows = packing.PackedPairs(packing.flatten_ids(src), packing.flatten_ids(tgt), src_len=4, tgt_len=5)
  assert rows.num_dropped == 1 and len(rows.kept) == 4
  seen = []
  for r in range(len(rows)):
    row = rows[r]
    for seg in range(1, row['src_segments'].max() + 1):
      s_at, t_at = row['src_segments'] == seg, row['tgt_segments'] == seg
      s, t_in, t_out = row['src'][s_at], row['tgt_in'][t_at], row['tgt_out'][t_at]
      assert t_in[0] == BOS and t_out[-1] == EOS and list(t_in[1:]) == list(t_out[:-1])
      np.testing.assert_array_equal(row['src_positions'][s_at], np.arange(len(s)))
      np.testing.assert_array_equal(row['tgt_positions'][t_at], np.arange(len(t_in)))
      seen.append((list(s), list(t_out[:-1])))
    assert np.all(row['src'][row['src_segments'] == 0] == PAD) and np.all(row['tgt_in'][row['tgt_segments'] == 0] == PAD)
  assert seen == [(s, t) for i, (s, t) in enumerate(zip(src, tgt)) if i != 2]
  assert len(rows) < len(seen)  # some rows hold more than one pair


def test_cached_decoding_equals_the_full_forward_pass():
  model = _model(pre_ln=True)
  params = _params(model)
  src = jnp.array([[3, 4, 5, 6, 0, 0], [6, 5, 4, 3, 5, 6]])
  tgt_in = jnp.array([[BOS, 3, 4, 5, 6], [BOS, 6, 6, 5, 3]])
  full_BxTxV = jax.jit(lambda s, t: model.apply({'params': params}, s, t, train=False))(src, tgt_in)
  seg = (src != 0).astype(jnp.int32)
  z = jax.jit(lambda s: model.apply({'params': params}, s, train=False, src_segments_BxS=seg,
                                    method=Transformer.encode))(src)
  cache = init_cache(model, src, tgt_in)
  decoder = model.clone(decode=True)
  step = jax.jit(lambda cache, token, i: decoder.apply(
      {'params': params, 'cache': cache}, z, seg, token, train=False, tgt_positions_BxT=jnp.full((2, 1), i),
      method=Transformer.decode_logits, mutable=['cache']))
  for i in range(tgt_in.shape[1]):
    logits, v = step(cache, tgt_in[:, i:i + 1], i)
    cache = v['cache']
    # logits up to ~25 in float32 (weights scaled by 3): the cached path differs by rounding only
    np.testing.assert_allclose(logits[:, 0], full_BxTxV[:, i], atol=5e-5, rtol=1e-5)


def test_packed_row_equals_each_pair_alone_and_padding_is_ignored():
  model = _model(positional='learned', max_len=16)
  params = _params(model)
  pairs = [([3, 4, 5], [BOS, 6, 3]), ([6, 6], [BOS, 4, 4, 5])]
  row = packing.PackedPairs(packing.flatten_ids([s for s, _ in pairs]),
                            packing.flatten_ids([t[1:] for _, t in pairs]), 8, 10)[0]
  packed = model.apply({'params': params}, row['src'][None], row['tgt_in'][None], train=False,
                       src_segments_BxS=row['src_segments'][None], src_positions_BxS=row['src_positions'][None],
                       tgt_segments_BxT=row['tgt_segments'][None], tgt_positions_BxT=row['tgt_positions'][None])[0]
  for seg, (s, t) in enumerate(pairs, start=1):
    alone = model.apply({'params': params}, jnp.array([s + [0, 0]]), jnp.array([t + [0]]), train=False)[0, :len(t)]
    np.testing.assert_allclose(packed[row['tgt_segments'] == seg], alone, atol=1e-5, rtol=1e-5)


def _step_fn(model, params, src):
  """A decoder step function over `src` (rows already repeated per beam), as the task builds it."""
  seg = (src != 0).astype(jnp.int32)
  z = model.apply({'params': params}, src, train=False, src_segments_BxS=seg, method=Transformer.encode)
  decoder = model.clone(decode=True)

  def step_fn(tokens, cache, i):
    logits, v = decoder.apply({'params': params, 'cache': cache}, z, seg, tokens, train=False,
                              tgt_positions_BxT=jnp.full((src.shape[0], 1), i), method=Transformer.decode_logits,
                              mutable=['cache'])
    return logits[:, 0], v['cache']
  return step_fn


def test_greedy_equals_argmax_of_repeated_full_passes_and_beam_size_1_equals_greedy():
  model, max_len = _model(vocab=9), 6
  params = _params(model, seed=1)
  src = jnp.array([[3, 4, 5, 0], [8, 7, 6, 5], [4, 4, 0, 0]])
  cache = init_cache(model, src, jnp.zeros((3, max_len), jnp.int32))
  greedy = beam_search.greedy_search(_step_fn(model, params, src), cache, 3, max_len=max_len, bos_id=BOS, eos_id=EOS)
  beam1, _ = beam_search.beam_search(_step_fn(model, params, src), cache, 3, beam_size=1, max_len=max_len,
                                     alpha=0.6, bos_id=BOS, eos_id=EOS)
  np.testing.assert_array_equal(greedy, beam1)
  # reference: no cache, the whole prefix through the model at every step (padded to one width: the
  # decoder is causal, so what follows the prefix cannot change its last logits)
  full = jax.jit(lambda s, t: model.apply({'params': params}, s, t, train=False))
  for b in range(3):
    prefix = [BOS]
    for _ in range(max_len):
      logits = full(src[b:b + 1], jnp.array([prefix + [PAD] * (max_len + 1 - len(prefix))]))
      prefix.append(int(jnp.argmax(logits[0, len(prefix) - 1])))
      if prefix[-1] == EOS:
        break
    out = prefix[1:] + [PAD] * (max_len - len(prefix) + 1)
    assert list(np.asarray(greedy[b])) == out


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_search_with_a_wide_beam_finds_the_exhaustive_optimum(alpha):
  """With K >= every live hypothesis, beam search must return the best of all sequences."""
  vocab, max_len, k = 5, 4, 320   # at most vocab * (vocab - 1) ** (max_len - 1) = 320 extensions a step
  model = _model(vocab=vocab)
  params = _params(model, seed=2)
  src = jnp.array([[3, 4, 0], [4, 3, 3]])
  rows = jnp.repeat(src, k, 0)
  tokens, score = beam_search.beam_search(
      _step_fn(model, params, rows), init_cache(model, rows, jnp.zeros((2 * k, max_len), jnp.int32)), 2, beam_size=k,
      max_len=max_len, alpha=alpha, bos_id=BOS, eos_id=EOS)
  others = [t for t in range(vocab) if t != EOS]
  for b in range(2):
    candidates = [list(c) + [EOS] for n in range(max_len) for c in itertools.product(others, repeat=n)]
    width = max(map(len, candidates))
    tgt_in = jnp.array([[BOS] + c + [PAD] * (width - len(c)) for c in candidates])
    logp = np.asarray(jax.nn.log_softmax(jax.jit(model.apply, static_argnames='train')(
        {'params': params}, jnp.repeat(src[b:b + 1], len(candidates), 0), tgt_in, train=False), -1), np.float64)
    scores = [sum(float(logp[j, i, t]) for i, t in enumerate(c)) / ((5 + len(c)) / 6) ** alpha
              for j, c in enumerate(candidates)]
    best = int(np.argmax(scores))
    assert list(np.asarray(tokens[b, :len(candidates[best])])) == candidates[best]
    np.testing.assert_allclose(float(score[b]), scores[best], rtol=1e-5)


def test_label_smoothed_loss_matches_its_formula():
  cfg = tiny_config('transformer', **{'dataset.train_examples': 200, 'model.d_model': 16, 'model.num_heads': 2,
                                      'model.d_ff': 32, 'model.dropout_rate': 0.0, 'label_smoothing': 0.2})
  data = registry.load(cfg.dataset, 'validation', None)
  task = translation_task.TranslationTask(cfg, data.info)
  batch = {k: np.stack([data.source[i][k] for i in range(4)]) for k in data.source[0]}
  params = nn.unbox(task.init_state(jax.random.key(0), batch).params)
  loss, (metrics, _) = task.loss_fn(params, {}, batch, jax.random.key(1))
  logits = np.asarray(task.apply(params, {}, task.model_inputs(batch), train=False, **task.model_kwargs(batch))[0],
                      np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  eps, v = 0.2, logits.shape[-1]
  w = batch['tgt_segments'] != 0
  y = batch['tgt_out']
  per_token = -((1 - eps) * np.take_along_axis(logp, y[..., None], -1)[..., 0] + eps / v * logp.sum(-1))
  np.testing.assert_allclose(float(loss), per_token[w].mean(), rtol=1e-5)
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(metrics['nll']), nll[w].mean(), rtol=1e-5)


def test_corpus_scores_exact_match_and_bleu():
  refs = ['dreihundertfünf', 'eins', 'zwölf']
  assert translation_task.corpus_scores(refs, refs, 'char')['bleu'] == pytest.approx(100.0)
  scores = translation_task.corpus_scores(['dreihundertfünf', 'einz', 'zwölf'], refs, 'char')
  assert scores['exact_match'] == pytest.approx(2 / 3) and 50 < scores['bleu'] < 100
  assert 'tok:char' in scores['bleu_signature']
  import sacrebleu  # pylint: disable=g-import-not-at-top
  hyps, refs = ['the cat sat on the mat .', 'a dog'], ['the cat sat on a mat .', 'a dog runs']
  assert translation_task.corpus_scores(hyps, refs, '13a')['bleu'] == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [refs]).score)


class _FakeTfdsSource:
  """What `tfds.data_source` returns for a translation data set: examples with bytes per language."""

  def __init__(self, n):
    words = ['haus', 'katze', 'hund', 'baum', 'house', 'cat', 'dog', 'tree', 'the', 'der']
    rng = np.random.default_rng(0)
    self.examples = [{lang: ' '.join(rng.choice(words, rng.integers(1, 8))).encode() for lang in ('de', 'en')}
                     for _ in range(n)]

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def __getitems__(self, keys):
    return [self.examples[k] for k in keys]


def test_wmt_pairs_from_a_tfds_data_source(tmp_path, monkeypatch):
  # TFDS's WMT builders need TensorFlow even for mock data; the data source is what we read.
  calls = []
  monkeypatch.setattr(translation, 'tfds_source',
                      lambda config, name, split, offline_alternative: calls.append((name, split)) or _FakeTfdsSource(30))
  cfg = tiny_config('transformer', **{'dataset.name': 'wmt14_translate/de-en', 'dataset.vocab_size': 280,
                                      'dataset.src_len': 64, 'dataset.tgt_len': 64}).dataset
  pairs = list(translation.wmt_pairs(cfg, 'test'))
  data = registry.load(cfg, 'test', Files(new_tokenizer=str(tmp_path / 'tokenizer.model')))
  assert calls[0] == ('wmt14_translate/de-en', 'test') and ('wmt14_translate/de-en', 'train') in calls
  fake = _FakeTfdsSource(30).examples
  assert pairs == [(ex['en'].decode(), ex['de'].decode()) for ex in fake]   # en -> de
  assert (tmp_path / 'tokenizer.model').exists() and data.tokenizer.vocab_size == 280
  first = data.source[0]
  assert data.source.num_dropped == 0 and first['src_segments'].max() > 1
  np.testing.assert_array_equal(first['src'][first['src_segments'] == 1], data.tokenizer.encode(pairs[0][0]))
  np.testing.assert_array_equal(first['tgt_out'][first['tgt_segments'] == 1],
                                data.tokenizer.encode(pairs[0][1]) + [EOS])
  with pytest.raises(UserError, match="has no split 'dev'"):
    translation.wmt_pairs(cfg, 'dev')
  cfg.source_lang = 'fr'
  with pytest.raises(UserError, match='languages de and en'):
    translation.wmt_pairs(cfg, 'test')


def test_train_eval_translate_commands(tmp_path):
  workdir = str(tmp_path / 'mt')
  args = ['--config=configs/transformer.py', f'--workdir={workdir}', '--config.dataset.train_examples=3000',
          '--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.num_encoder_layers=1',
          '--config.model.num_decoder_layers=1', '--config.num_train_steps=40', '--config.log_every_steps=20',
          '--config.eval_every_steps=40', '--config.checkpoint_every_steps=40', '--config.optimizer.warmup_steps=10',
          '--config.decode.beam_size=2', '--config.decode.max_len=16']
  run_cli('train.py', *args, check=True)
  run_cli('eval.py', *args, check=True)
  with open(f'{workdir}/eval.json') as f:
    result = json.load(f)
  for key in ('loss', 'accuracy', 'bleu', 'exact_match', 'chrf', 'long/bleu', 'long/exact_match'):
    assert math.isfinite(result[key]), key
  assert 'tok:char' in result['bleu_signature']
  with open(f'{workdir}/translations-test.tsv') as f:
    lines = f.read().splitlines()
  assert lines[0] == 'source\treference\thypothesis' and len(lines) == 1 + len(translation.numbers('test'))
  proc = run_cli('eval.py', *args, '--mode=translate', '--input=three hundred and five', '--input=twelve', check=True)
  assert proc.stdout.splitlines()[-2].startswith('three hundred and five\t')
  # (An empty --input and decode.beam_size=0 are one line each: tests/test_recovery.py, tests/test_bad_input.py.)
