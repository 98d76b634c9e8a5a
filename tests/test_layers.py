"""The shared Transformer parts against independent references (naive attention, the papers' formulas)."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.models import layers
from model_zoo.models.gpt import GPT
from model_zoo.models.protocol import init_cache


def naive_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxTxS):
  """softmax(Q K^T / sqrt(d)) V per head, in float64 numpy, with each query group sharing a kv head."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi, ni, ti in itertools.product(range(b), range(n), range(t)):
    keys = np.flatnonzero(allowed_BxTxS[bi, ti])
    if not len(keys):
      continue
    scores = k[bi, keys, ni // group] @ q[bi, ti, ni] / np.sqrt(h)
    p = np.exp(scores - scores.max())
    out[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, ni // group]
  return out


def _attention_module_parts(module, params, x):
  """q, k, v and the output projection of a MultiHeadAttention, taken from its parameters."""
  p = jax.tree.map(np.asarray, params)
  q = np.einsum('btd,dnh->btnh', x, p['query']['kernel'])
  k = np.einsum('btd,dnh->btnh', x, p['key']['kernel'])
  v = np.einsum('btd,dnh->btnh', x, p['value']['kernel'])
  return q, k, v, p['out']['kernel']


SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])


def _allowed(mask_kind, segments, b, t):
  """The [B, T, S] keys each query may read, written out from the definitions."""
  allowed = np.ones((b, t, t), bool)
  segments = (segments > 0).astype(int) if mask_kind == 'padding' else segments
  if mask_kind in ('padding', 'packed', 'packed_causal'):
    allowed &= (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
  if mask_kind == 'lengths':
    allowed &= np.arange(t)[None, None, :] < (segments != 0).sum(1)[:, None, None]
  if mask_kind.endswith('causal'):
    allowed &= np.tril(np.ones((t, t), bool))
  return allowed


def _mask(mask_kind, segments):
  segments = jnp.asarray(segments)
  return {'none': None, 'causal': layers.Mask(causal=True), 'padding': layers.Mask(q_segments_BxT=segments > 0),
          'packed': layers.Mask(q_segments_BxT=segments),
          'packed_causal': layers.Mask(causal=True, q_segments_BxT=segments),
          'lengths': layers.Mask(kv_lengths_B=jnp.sum(segments != 0, axis=1))}[mask_kind]


@pytest.mark.parametrize('mask_kind', ['none', 'causal', 'padding', 'packed', 'packed_causal', 'lengths'])
@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])
def test_attention_matches_naive_softmax(mask_kind, num_kv_heads):
  b, t, d = 2, 8, 16
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  module = layers.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=num_kv_heads)
  params = nn.unbox(module.init(jax.random.key(1), x)['params'])
  got = module.apply({'params': params}, x, mask=_mask(mask_kind, SEGMENTS))
  allowed = _allowed(mask_kind, SEGMENTS, b, t)
  q, k, v, wo = _attention_module_parts(module, params, np.asarray(x))
  want = np.einsum('btnh,nhd->btd', naive_attention(q, k, v, allowed), wo)
  rows = allowed.any(-1)  # rows with no allowed key (padding queries) are undefined
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('t', [64, 128, 256])
@pytest.mark.parametrize('mask_kind', ['causal', 'packed_causal'])
def test_causal_query_blocks_match_naive_softmax(t, mask_kind):
  """Long enough rows that causal attention runs in query blocks (layers.causal_blocks: 1, 2 and 4 of them),
  each block reading only the keys up to its last query; packed documents cross the blocks' edges."""
  b, n, k_heads, e = 2, 4, 2, 8
  q, k, v = (jax.random.normal(key, (b, t, h, e)) for key, h in zip(jax.random.split(jax.random.key(0), 3),
                                                                     (n, k_heads, k_heads)))
  segments = np.stack([np.repeat([1, 2, 3, 0], t // 4), np.repeat([1, 2], [t // 2 + 5, t // 2 - 5])])
  got = layers.dot_product_attention(q, k, v, _mask(mask_kind, segments))
  allowed = _allowed(mask_kind, segments, b, t)
  want = naive_attention(q, k, v, allowed)
  rows = allowed.any(-1)
  assert layers.causal_blocks(t, t) == {64: 1, 128: 2, 256: 4}[t]
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('t, mask_kind', [(8, 'none'), (8, 'packed'), (8, 'lengths'), (128, 'packed_causal')])
def test_attention_gradients_match_the_softmax_formula(t, mask_kind):
  """The hand-written backward pass (recomputed probabilities, FlashAttention-2's equations) against JAX's
  derivative of the plain formula softmax(q k^T / sqrt(E) + mask) v, grouped-query, in float64."""
  b, n, k_heads, e = 2, 4, 2, 8
  with jax.enable_x64():
    q, k, v, d_out = (jax.random.normal(key, (b, t, h, e), jnp.float64) for key, h in zip(
        jax.random.split(jax.random.key(0), 4), (n, k_heads, k_heads, n)))
    segments = SEGMENTS if t == 8 else np.stack([np.repeat([1, 2, 3, 0], t // 4), np.repeat([1, 2], [70, 58])])
    allowed = jnp.asarray(_allowed(mask_kind, segments, b, t))

    def formula(q, k, v):
      k, v = jnp.repeat(k, n // k_heads, axis=2), jnp.repeat(v, n // k_heads, axis=2)
      logits = jnp.einsum('btne,bsne->bnts', q, k) / np.sqrt(e)
      p = jax.nn.softmax(jnp.where(allowed[:, None], logits, -1e300), axis=-1)
      return jnp.einsum('bnts,bsne->btne', p, v)
    rows = jnp.asarray(allowed.any(-1))[:, :, None, None]   # a query with no key to read has no defined output
    loss = lambda f: lambda *a: jnp.sum(jnp.where(rows, f(*a) * d_out, 0.0))
    got = jax.grad(loss(lambda *a: layers.dot_product_attention(*a, _mask(mask_kind, segments))), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(formula), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('x_shape, w_shape', [((2, 5, 8), (8, 16)),       # in < out (the MLP's first layer)
                                               ((2, 5, 16), (16, 8)),      # in > out (its second: dW transposed)
                                               ((2, 5, 4, 6), (4, 6, 10)),  # two input axes (attention's output)
                                               ((7, 8), (8, 2, 3))])        # two output axes (q, k, v)
def test_dense_matmul_gradients_are_the_dot_products(x_shape, w_shape):
  """layers.matmul's written-out backward pass (the dense layers' on the CPU) against JAX's derivative of
  lax.dot_general, in float64: alone and as integrated gradients take it, mapped in chunks (scan of vmap);
  in bfloat16 its gradients keep the inputs' dtypes."""
  n = 2 if len(x_shape) == 4 else 1
  numbers = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))
  with jax.enable_x64():
    x, w = (jax.random.normal(k, s, jnp.float64)
            for k, s in zip(jax.random.split(jax.random.key(0)), (x_shape, w_shape)))
    loss = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, numbers)))
    assert 'custom_vjp_call' in str(jax.make_jaxpr(loss(layers.matmul))(x, w))   # the written-out pass, on the CPU
    got, want = (jax.grad(loss(dot), (0, 1))(x, w) for dot in (layers.matmul, jax.lax.dot_general))
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
    mapped = lambda dot: jax.lax.map(lambda a: jax.grad(loss(dot), (0, 1))(a * x, w), jnp.linspace(0.1, 1, 6),
                                     batch_size=3)
    for g, r in zip(jax.jit(lambda: mapped(layers.matmul))(), mapped(jax.lax.dot_general)):
      np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert [g.dtype for g in jax.grad(loss(layers.matmul), (0, 1))(x16, w16)] == [jnp.bfloat16] * 2


@pytest.mark.parametrize('shape', [(2, 5, 16), (7, 32)])
def test_layer_norm_and_its_gradients_follow_the_formula(shape):
  """layers.LayerNorm (its backward pass written out on the CPU) against the formula in float64 and JAX's
  derivative of it: outputs and the gradients of x, scale and bias, alone and mapped in chunks (a scan of a vmap,
  as integrated gradients take it) with the cotangent shared by every mapped point, which is how
  XLA:CPU's YNNPACK reductions once gave wrong gradients (benchmarks/README.md); flax's nn.LayerNorm's parameters
  and, to float32 rounding, its outputs; bfloat16 inputs give bfloat16 outputs and gradients."""
  d = shape[-1]
  module = layers.layer_norm(jnp.float32, epsilon=1e-5)
  x0 = jax.random.normal(jax.random.key(0), shape) * 3 + 1
  params = module.init(jax.random.key(1), x0)['params']
  flax_params = nn.LayerNorm(epsilon=1e-5).init(jax.random.key(1), x0)['params']
  assert jax.tree.map(jnp.shape, nn.unbox(params)) == jax.tree.map(jnp.shape, flax_params)
  np.testing.assert_allclose(module.apply({'params': params}, x0), nn.LayerNorm(epsilon=1e-5).apply(
      {'params': flax_params}, x0), rtol=1e-5, atol=1e-5)
  with jax.enable_x64():
    keys = jax.random.split(jax.random.key(2), 4)
    x, dy = (jax.random.normal(k, shape, jnp.float64) * 3 + 1 for k in keys[:2])
    scale, bias = (jax.random.normal(k, (d,), jnp.float64) for k in keys[2:])

    def formula(x, scale, bias):
      mean = jnp.mean(x, -1, keepdims=True)
      var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
      return (x - mean) / jnp.sqrt(var + 1e-5) * jnp.broadcast_to(scale, x.shape) + jnp.broadcast_to(bias, x.shape)

    def ours(x, scale, bias):
      return layers.layer_norm(jnp.float64).apply({'params': {'scale': scale, 'bias': bias}}, x)
    assert 'custom_vjp_call' in str(jax.make_jaxpr(ours)(x, scale, bias))   # the written-out backward pass
    loss = lambda f: lambda *a: jnp.sum(f(*a) * dy)
    np.testing.assert_allclose(ours(x, scale, bias), formula(x, scale, bias), rtol=1e-12, atol=1e-12)
    for got, want in zip(jax.grad(loss(ours), (0, 1, 2))(x, scale, bias),
                         jax.grad(loss(formula), (0, 1, 2))(x, scale, bias)):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    points = (jnp.arange(32.) + 0.5) / 32
    mapped = lambda f: jax.jit(lambda x: jax.lax.map(lambda a: jax.grad(loss(f))(a * x, scale, bias), points,
                                                     batch_size=16))
    np.testing.assert_allclose(mapped(ours)(x), mapped(formula)(x), rtol=1e-10, atol=1e-10)
  x16 = x0.astype(jnp.bfloat16)
  bf16 = layers.layer_norm(jnp.bfloat16)
  grads = jax.grad(lambda x, p: jnp.sum(bf16.apply({'params': p}, x).astype(jnp.float32)), (0, 1))(x16, params)
  assert bf16.apply({'params': params}, x16).dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  assert jax.tree.map(lambda g: g.dtype, nn.unbox(grads[1])) == {'scale': jnp.float32, 'bias': jnp.float32}


def test_cross_attention_matches_naive_softmax():
  x, enc = jax.random.normal(jax.random.key(0), (2, 5, 16)), jax.random.normal(jax.random.key(1), (2, 7, 16))
  enc_segments = np.array([[1] * 7, [1] * 4 + [0] * 3])
  module = layers.MultiHeadAttention(num_heads=2, head_dim=8)
  params = nn.unbox(module.init(jax.random.key(2), x, enc)['params'])
  got = module.apply({'params': params}, x, enc, mask=layers.Mask(kv_segments_BxS=jnp.asarray(enc_segments)))
  p = jax.tree.map(np.asarray, params)
  q = np.einsum('btd,dnh->btnh', x, p['query']['kernel'])
  k = np.einsum('bsd,dnh->bsnh', enc, p['key']['kernel'])
  v = np.einsum('bsd,dnh->bsnh', enc, p['value']['kernel'])
  allowed = np.broadcast_to((enc_segments != 0)[:, None, :], (2, 5, 7))
  want = np.einsum('btnh,nhd->btd', naive_attention(q, k, v, allowed), p['out']['kernel'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sinusoidal_positions_follow_the_paper():
  d = 6
  got = np.asarray(layers.sinusoidal_positions(jnp.arange(5)[None], d))[0]
  for pos, i in itertools.product(range(5), range(d // 2)):
    assert got[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / d)), abs=1e-6)
    assert got[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / d)), abs=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  score = lambda pq, pk: float(jnp.sum(layers.apply_rotary(q, jnp.array([[pq]])) *
                                       layers.apply_rotary(k, jnp.array([[pk]]))))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rotary(q, jnp.array([[7]]))), jnp.linalg.norm(q),
                             rtol=1e-6)


@pytest.mark.parametrize('activation', ['gelu', 'relu', 'swiglu'])
def test_mlp_matches_numpy(activation):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  module = layers.MLP(d_ff=16, activation=activation)
  params = nn.unbox(module.init(jax.random.key(1), x, train=False)['params'])
  p = jax.tree.map(np.asarray, params)
  xn = np.asarray(x, np.float64)
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  lin = lambda name, z: z @ p[name]['kernel'] + p[name]['bias']
  if activation == 'swiglu':
    g = lin('wi_gate', xn)
    h = g / (1 + np.exp(-g)) * lin('wi', xn)
  else:
    h = {'gelu': gelu, 'relu': lambda z: np.maximum(z, 0)}[activation](lin('wi', xn))
  np.testing.assert_allclose(module.apply({'params': params}, x, train=False), lin('wo', h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('pre_ln', [True, False])
def test_block_orders_norm_and_residual_as_named(pre_ln):
  """Pre-LN: x + F(LN(x)); post-LN: LN(x + F(x)), built here from the block's own sublayers."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  block = layers.TransformerBlock(layers.BlockConfig(num_heads=2, head_dim=8, d_ff=32, pre_ln=pre_ln))
  causal = layers.Mask(causal=True)
  params = nn.unbox(block.init(jax.random.key(1), x, train=False, mask=causal)['params'])
  got = block.apply({'params': params}, x, train=False, mask=causal)
  attn = lambda y: layers.MultiHeadAttention(2, 8).apply({'params': params['self_attention']}, y, mask=causal)
  mlp = lambda y: layers.MLP(32).apply({'params': params['mlp']}, y, train=False)
  norm = lambda name, y: layers.layer_norm(jnp.float32).apply({'params': params[name]}, y)
  if pre_ln:
    h = x + attn(norm('self_attention_norm', x))
    want = h + mlp(norm('mlp_norm', h))
  else:
    h = norm('self_attention_norm', x + attn(x))
    want = norm('mlp_norm', h + mlp(h))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('positional', ['learned', 'sinusoidal', 'rotary'])
@pytest.mark.parametrize('num_kv_heads', [0, 2])
def test_cached_decoding_equals_the_full_forward_pass(positional, num_kv_heads):
  model = GPT(vocab_size=40, num_layers=2, d_model=32, num_heads=4, num_kv_heads=num_kv_heads, d_ff=64,
              max_len=16, positional=positional, activation='swiglu')
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 40)
  params = nn.unbox(model.init(jax.random.key(0), tokens, train=False)['params'])
  full = model.apply({'params': params}, tokens, train=False)
  decoder, cache = model.clone(decode=True), init_cache(model, jnp.zeros((2, 16), jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  logits = []
  step = jax.jit(lambda cache, t, p: decoder.apply({'params': params, 'cache': cache}, t, train=False,
                                                   positions_BxT=p, mutable=['cache']))
  for start, stop in [(0, 4)] + [(i, i + 1) for i in range(4, 11)]:  # a prompt, then one token at a time
    out, variables = step(cache, tokens[:, start:stop], positions[:, start:stop])
    cache = variables['cache']
    logits.append(out)
  np.testing.assert_allclose(jnp.concatenate(logits, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_rows_equal_documents_run_alone():
  model = GPT(vocab_size=30, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=16)
  doc_a, doc_b = jnp.arange(1, 6)[None], jnp.arange(10, 14)[None]
  packed = jnp.concatenate([doc_a, doc_b], 1)
  segments = jnp.array([[1] * 5 + [2] * 4])
  positions = jnp.array([list(range(5)) + list(range(4))])
  params = nn.unbox(model.init(jax.random.key(0), packed, train=False)['params'])
  apply = jax.jit(lambda t, p=None, s=None: model.apply({'params': params}, t, train=False, positions_BxT=p,
                                                       segment_ids_BxT=s))
  got = apply(packed, positions, segments)
  alone = [apply(doc) for doc in (doc_a, doc_b)]
  np.testing.assert_allclose(got, jnp.concatenate(alone, 1), rtol=1e-5, atol=1e-5)


def test_causality_by_gradients():
  """d logits_t / d token-embedding_s is zero for s > t."""
  model = GPT(vocab_size=20, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=8)
  tokens = jnp.arange(8)[None] % 20
  params = nn.unbox(model.init(jax.random.key(0), tokens, train=False)['params'])
  def f(emb_delta):
    p = jax.tree.map(lambda x: x, params)
    p['pos_embedding'] = params['pos_embedding'] + emb_delta
    return model.apply({'params': p}, tokens, train=False)[0, 3].sum()
  g = jax.jit(jax.grad(f))(jnp.zeros((8, 16)))
  assert np.abs(g[4:]).max() == 0 and np.abs(g[:4]).max() > 0
