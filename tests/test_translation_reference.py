"""The translation Transformer and its decoding against independent references:

- a float64 numpy forward pass of the encoder-decoder, written from the paper (post-LN sublayers,
  embeddings scaled by sqrt(d), one embedding matrix for source, target and output, a padding mask
  on the source, causal self-attention and cross-attention in the decoder);
- a naive beam search over full forward passes (no cache, Python lists), with GNMT's length penalty
  and the finished-set rule of model_zoo.inference.beam_search, for beams 2 and 3, against the
  production path (`TranslationTask.translate`: tokenize, pad, jitted beam search, detokenize);
- chrF from its definition (Popović, 2015; sacrebleu's corpus statistics) against `corpus_scores`.
"""
import collections
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from model_zoo.data.base import DataInfo
from model_zoo.data.tokenizers import ByteTokenizer
from model_zoo.models.transformer import Transformer
from model_zoo.tasks import translation as translation_task

D, HEADS, LAYERS = 16, 2, 2


def _perturbed_params(model, seed):
  """Random weights everywhere, LayerNorm scales and biases included (the init's 1 and 0 would hide them)."""
  params = nn.unbox(model.init(jax.random.key(seed), jnp.ones((1, 5), jnp.int32), jnp.ones((1, 4), jnp.int32),
                               train=False)['params'])
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  noisy = [np.asarray(x) * 3.0 + rng.normal(0, 0.3, x.shape).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(tree, noisy)


def _layer_norm(x, p, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _attention(x, kv, p, mask):
  """Multi-head attention, eq. 1 of the paper: softmax(Q K^T / sqrt(d_k)) V per head; `mask` [T, S]."""
  q = np.einsum('td,dne->nte', x, p['query']['kernel'])
  k = np.einsum('sd,dne->nse', kv, p['key']['kernel'])
  v = np.einsum('sd,dne->nse', kv, p['value']['kernel'])
  scores = np.einsum('nte,nse->nts', q, k) / math.sqrt(q.shape[-1])
  scores = np.where(mask[None], scores, -np.inf)
  top = np.where(mask[None].any(-1, keepdims=True), scores.max(-1, keepdims=True), 0.0)
  weights = np.exp(scores - top)
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)   # a query with no key: zeros
  return np.einsum('nts,nse,ned->td', weights, v, p['out']['kernel'])


def _ffn(x, p):
  """Eq. 2: max(0, x W1 + b1) W2 + b2."""
  h = np.maximum(0, x @ p['wi']['kernel'] + p['wi']['bias'])
  return h @ p['wo']['kernel'] + p['wo']['bias']


def _positions(t):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
  pe = np.zeros((t, D))
  for pos in range(t):
    for i in range(0, D, 2):
      pe[pos, i] = math.sin(pos / 10000 ** (i / D))
      pe[pos, i + 1] = math.cos(pos / 10000 ** (i / D))
  return pe


def numpy_transformer(params, src, tgt_in):
  """Logits [T, V] of one (source, target) pair; source tokens 0 are padding."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  table = p['embed']['embedding']
  src_real = np.asarray(src) != 0
  x = table[src] * math.sqrt(D) + _positions(len(src))
  for i in range(LAYERS):   # post-LN: LN(x + Sublayer(x))
    b = p['encoder'][f'block_{i}']
    mask = src_real[None, :] & src_real[:, None]
    x = _layer_norm(x + _attention(x, x, b['self_attention'], mask), b['self_attention_norm'])
    x = _layer_norm(x + _ffn(x, b['mlp']), b['mlp_norm'])
  y = table[tgt_in] * math.sqrt(D) + _positions(len(tgt_in))
  causal = np.tril(np.ones((len(tgt_in), len(tgt_in)), bool))
  for i in range(LAYERS):
    b = p['decoder'][f'block_{i}']
    y = _layer_norm(y + _attention(y, y, b['self_attention'], causal), b['self_attention_norm'])
    cross = np.broadcast_to(src_real[None, :], (len(tgt_in), len(src)))
    y = _layer_norm(y + _attention(y, x, b['cross_attention'], cross), b['cross_attention_norm'])
    y = _layer_norm(y + _ffn(y, b['mlp']), b['mlp_norm'])
  return y @ table.T   # the output projection is the embedding matrix


def test_forward_pass_equals_numpy():
  model = Transformer(vocab_size=11, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS, d_model=D,
                      num_heads=HEADS, d_ff=32, dropout_rate=0.0)
  params = _perturbed_params(model, seed=3)
  src = np.array([[3, 5, 7, 9, 2, 0, 0], [4, 4, 6, 2, 0, 0, 0]], np.int32)   # padded sources
  tgt = np.array([[1, 8, 3, 10, 2], [1, 5, 5, 0, 0]], np.int32)
  got = np.asarray(model.apply({'params': params}, jnp.asarray(src), jnp.asarray(tgt), train=False))
  for row in range(2):
    want = numpy_transformer(params, src[row], tgt[row])
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[row], want, atol=2e-5 * scale, rtol=0)
  # the padding really is masked: more of it changes nothing
  wider = np.pad(src, ((0, 0), (0, 5)))
  np.testing.assert_allclose(model.apply({'params': params}, jnp.asarray(wider), jnp.asarray(tgt), train=False), got,
                             atol=1e-5, rtol=1e-5)
  assert np.abs(got[0] - got[1]).max() > 0.1   # rows differ: the inputs matter


def naive_beam_search(logprobs_fn, *, beam_size, max_len, alpha, eos_id):
  """Beam search with Python lists and a full forward pass (`logprobs_fn(prefix) -> [V]`) for each
  hypothesis. Each step extends every alive hypothesis by every token; of the 2J best extensions,
  those among the best J that end in EOS are finished (score logp / ((5 + len) / 6)^alpha, len
  counting EOS) and the best J that do not stay alive; the finished set keeps its J best; the search
  ends once it holds J that no alive hypothesis can beat (at best log p / lp(max_len)), or after max_len
  tokens (then the best finished one, or the best alive one)."""
  alive, finished = [((), 0.0)], []
  lp_max = ((5 + max_len) / 6) ** alpha
  for i in range(max_len):
    candidates = []
    for prefix, logp in alive:
      scores = logprobs_fn(prefix)
      candidates += [(prefix + (tok,), logp + float(s)) for tok, s in enumerate(scores)]
    candidates.sort(key=lambda c: -c[1])
    top = candidates[:2 * beam_size]
    finished += [(seq, logp / ((5 + i + 1) / 6) ** alpha) for seq, logp in top[:beam_size] if seq[-1] == eos_id]
    finished = sorted(finished, key=lambda c: -c[1])[:beam_size]
    alive = [c for c in top if c[0][-1] != eos_id][:beam_size]
    if len(finished) == beam_size and alive[0][1] / lp_max <= finished[-1][1]:
      break
  return list(finished[0][0]) if finished else list(alive[0][0])


@pytest.mark.parametrize('beam_size', [2, 3])
def test_the_translate_path_equals_a_naive_beam_search(beam_size):
  tok, alpha, max_len = ByteTokenizer(), 0.6, 7
  config = tiny_config('transformer', **{'dataset.vocab_size': tok.vocab_size, 'model.d_model': D,
                                         'model.num_heads': HEADS, 'model.d_ff': 32, 'model.dropout_rate': 0.0,
                                         'model.num_encoder_layers': LAYERS, 'model.num_decoder_layers': LAYERS,
                                         'decode.beam_size': beam_size, 'decode.alpha': alpha,
                                         'decode.max_len': max_len, 'batch_size': 4})
  s, t = config.dataset.src_len, config.dataset.tgt_len
  example = {k: np.zeros(n, np.int32) for k, n in [('src', s), ('src_segments', s), ('src_positions', s),
                                                    ('tgt_in', t), ('tgt_out', t), ('tgt_segments', t),
                                                    ('tgt_positions', t)]}
  task = translation_task.TranslationTask(config, DataInfo(example=example, tokenizer=tok))
  params = _perturbed_params(task.model, seed=2)
  # EOS's output row along the last LayerNorm's bias (which every decoder output carries): EOS becomes likely
  # enough that hypotheses finish at several lengths, and some never do within max_len
  u = params['decoder'][f'block_{LAYERS - 1}']['mlp_norm']['bias']
  params['embed']['embedding'][tok.eos_id] = u * 24.0 / (u @ u)
  texts = ['three hundred', 'twelve', 'a', 'forty-two thousand and one', 'seven', 'nine', 'one hundred and six', 'x']
  got = task.translate(params, texts)   # in two batches of config.batch_size rows

  full = jax.jit(lambda src, tgt: task.model.apply({'params': params}, src, tgt, train=False))
  lengths = []
  for text, out in zip(texts, got):
    src = jnp.asarray([tok.encode(text)], jnp.int32)

    def logprobs(prefix):
      tgt = jnp.asarray([[tok.bos_id, *prefix] + [tok.pad_id] * (max_len + 1 - len(prefix))], jnp.int32)
      return np.asarray(jax.nn.log_softmax(full(src, tgt)[0, len(prefix)]))

    want = naive_beam_search(logprobs, beam_size=beam_size, max_len=max_len, alpha=alpha, eos_id=tok.eos_id)
    lengths.append(len(want) if want[-1] == tok.eos_id else None)
    assert out == tok.decode([x for x in want if x != tok.eos_id]), (text, out, want)
  # both ends of the search were exercised: finished hypotheses of several lengths, and the max_len fallback
  assert None in lengths and len({n for n in lengths if n}) >= 2, lengths


def _chrf(hypotheses, references, order=6, beta=2.0):
  """chrF (Popović, 2015) as sacrebleu computes a corpus score: character n-grams of 1..6 with whitespace
  removed, matches clipped by the reference counts and summed over the corpus per order; precision and
  recall averaged over the orders that occur; F_beta of the two averages."""
  stats = np.zeros((order, 3))   # hypothesis n-grams, reference n-grams, matches
  for hyp, ref in zip(hypotheses, references):
    h, r = ''.join(hyp.split()), ''.join(ref.split())
    for n in range(1, order + 1):
      hc = collections.Counter(h[i:i + n] for i in range(len(h) - n + 1))
      rc = collections.Counter(r[i:i + n] for i in range(len(r) - n + 1))
      stats[n - 1] += [sum(hc.values()), sum(rc.values()), sum((hc & rc).values())]
  used = [(m / nh, m / nr) for nh, nr, m in stats if nh > 0 and nr > 0]
  p, r = np.mean([u[0] for u in used]), np.mean([u[1] for u in used])
  return 100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if p + r else 0.0


def test_chrf_follows_its_definition():
  refs = ['three hundred and five', 'twelve', 'forty-two thousand', 'seven hundred and seventy-seven']
  hyps = ['three hundred and four', 'twelve', 'forty two thousands', 'seventy-seven']
  scores = translation_task.corpus_scores(hyps, refs, '13a')
  assert scores['chrf'] == pytest.approx(_chrf(hyps, refs), rel=1e-12)
  assert 0 < scores['chrf'] < 100 and translation_task.corpus_scores(refs, refs, '13a')['chrf'] == pytest.approx(100)
  assert scores['exact_match'] == 0.25
