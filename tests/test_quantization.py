"""Quantization (model_zoo/compression/quantization.py): the stored integers against the float weights and the
absmax rule, quantized layers against numpy integer arithmetic, GPTQ against round-to-nearest on GPTQ's own
objective, int4 packing, and PTQ of every family. Trained work directories: tests/test_ptq.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import FAMILIES, bytes_by_hand, family_config, family_data
from model_zoo.compression import ptq, quantization, settings
from model_zoo.config import base_config
from model_zoo.data import pipeline
from model_zoo.experiment import build_experiment
from model_zoo.models import layers, protocol
from model_zoo.models import registry as models
from model_zoo.training import sharding


def _q(**settings):
  q = base_config().quantization
  q.update(mode='ptq', **settings)
  return q


class _Net(nn.Module):
  """A convolution and a dense layer in blocks, and a float head."""

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    h = nn.relu(layers.conv(8, 3, name='block_0')(x_BxHxWxC))
    h = nn.relu(layers.linear(32, 'block_1')(h.reshape(h.shape[0], -1)))
    return layers.linear(10, 'cls_head')(h)


def _net(q, x):
  float_params = nn.unbox(_Net().init(jax.random.key(0), x))['params']
  model = quantization.quantized_model(_Net(), q)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x))['params'])
  return model, float_params, abstract, quantization.quantize(float_params, abstract)


def _expand(scale, shape):
  """A scale broadcast to its weight's shape (tiles repeated)."""
  for axis, (s, n) in enumerate(zip(scale.shape, shape)):
    if s not in (1, n):
      scale = np.repeat(scale, n // s, axis=axis)
  return np.broadcast_to(scale, shape)


@pytest.mark.parametrize('weight_dtype, tile_size', [('int8', 0), ('int4', 0), ('int8', 16), ('int4', 16)])
def test_int_weights_times_scales_are_the_float_weights_within_half_a_step(weight_dtype, tile_size):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  _, float_params, _, qparams = _net(_q(weight_dtype=weight_dtype, tile_size=tile_size), x)
  qmax = {'int8': 127, 'int4': 7}[weight_dtype]   # the grid is [-qmax - 1, qmax]
  flat = traverse_util.flatten_dict(qparams, is_leaf=lambda _, v: isinstance(v, quantization.WithAux))
  assert {k for k, v in flat.items() if isinstance(v, quantization.WithAux)} == {
      ('block_0', 'kernel'), ('block_1', 'kernel')}
  for path, leaf in flat.items():
    w = np.asarray(traverse_util.flatten_dict(float_params)[path], np.float64)
    if not isinstance(leaf, quantization.WithAux):
      np.testing.assert_array_equal(leaf, w)
      continue
    q = np.asarray(leaf.array.qvalue).astype(np.int64)
    s = _expand(np.asarray(leaf.array.scale, np.float64), w.shape)
    assert -qmax - 1 <= q.min() and q.max() <= qmax
    np.testing.assert_array_less(np.abs(q * s - w), s / 2 * (1 + 1e-4))   # float32 at the bucket edges
    # absmax: each channel's (or tile's) scale is its largest |w| over qmax + 1/2 (the edge of the top bucket)
    out_axis = w.ndim - 1
    if path == ('block_1', 'kernel') and tile_size:
      expect = np.abs(w).reshape(-1, tile_size, w.shape[-1]).max(1) / (qmax + 0.5)
      np.testing.assert_allclose(np.asarray(leaf.array.scale).reshape(expect.shape), expect, rtol=1e-6)
    else:
      expect = np.abs(w).max(axis=tuple(range(out_axis)), keepdims=True) / (qmax + 0.5)
      np.testing.assert_allclose(np.asarray(leaf.array.scale, np.float64), expect, rtol=1e-6)


def _int8_rows(x, axes):
  """Symmetric int8 of x with one scale per index of the axes not in `axes` (as int64 and float64). The
  largest |x| lands on the edge of the top bucket, 127.5, and goes to 127."""
  x = np.asarray(x, np.float64)
  absmax = np.abs(x).max(axis=axes, keepdims=True)
  s = absmax / 127.5
  return np.clip(np.round(x / s), -128, 127).astype(np.int64), s


def _on_the_grid(shape, seed):
  """Inputs k / 64 with integer k: each row's largest |x| is +127/64, the others at most 126/64, so that
  x / s = k * 127.5 / 127 is never within float32's error of a rounding tie."""
  rng = np.random.default_rng(seed)
  k = rng.integers(-126, 127, shape).reshape(shape[0], -1)
  k[np.arange(shape[0]), rng.integers(0, k.shape[1], shape[0])] = 127
  return (k / 64).reshape(shape).astype(np.float32)


def _im2col(x_BxHxWxC, k):
  """3x3 'SAME' patches: [B, H, W, k*k*C] (the order of a kernel [k, k, C, F] reshaped)."""
  p = k // 2
  padded = np.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x_BxHxWxC.shape[1:3]
  return np.concatenate([padded[:, i:i + h, j:j + w, :][..., None, :] for i in range(k) for j in range(k)],
                        axis=-2).reshape(*x_BxHxWxC.shape[:3], -1)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x_BxD):
    return layers.linear(16, 'block_0')(x_BxD)


def _kernel(qparams, name):
  a = qparams[name]['kernel'].array
  return np.asarray(a.qvalue).astype(np.int64), np.asarray(a.scale, np.float64)


@pytest.mark.parametrize('act_dtype', ['none', 'int8'])
def test_a_quantized_convolution_computes_what_numpy_integer_arithmetic_does(act_dtype):
  x = _on_the_grid((4, 6, 6, 3), 0)
  model, float_params, _, qparams = _net(_q(act_dtype=act_dtype), jnp.asarray(x))
  got = model.apply({'params': qparams}, jnp.asarray(x), capture_intermediates=True,
                    mutable=['intermediates'])[1]['intermediates']['block_0']['__call__'][0]
  (q, s), b = _kernel(qparams, 'block_0'), np.asarray(float_params['block_0']['bias'], np.float64)
  q, s = q.reshape(-1, 8), s.reshape(1, 8)
  if act_dtype == 'int8':   # one scale per example for a convolution's input
    qx, sx = _int8_rows(x.reshape(4, -1), (1,))
    want = (_im2col(qx.reshape(x.shape), 3) @ q) * sx.reshape(4, 1, 1, 1) * s + b
  else:
    want = _im2col(x.astype(np.float64), 3) @ (q * s) + b
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('act_dtype', ['none', 'int8'])
def test_a_quantized_dense_layer_computes_what_numpy_integer_arithmetic_does(act_dtype):
  x = _on_the_grid((8, 24), 1)
  params = nn.unbox(_Dense().init(jax.random.key(0), x))['params']
  model = quantization.quantized_model(_Dense(), _q(act_dtype=act_dtype))
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x))['params'])
  qparams = quantization.quantize(params, abstract)
  (q, s), b = _kernel(qparams, 'block_0'), np.asarray(params['block_0']['bias'], np.float64)
  if act_dtype == 'int8':   # one scale per row (example, or token) for a dense layer's input
    qx, sx = _int8_rows(x, (1,))
    want = (qx @ q) * sx * s + b
  else:
    want = x.astype(np.float64) @ (q * s) + b
  np.testing.assert_allclose(model.apply({'params': qparams}, jnp.asarray(x)), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('name', ['cnn', 'gpt'])
def test_a_quantized_model_whose_rules_match_nothing_is_the_float_model_exactly(name):
  config = family_config(name)
  kwargs = {'num_classes': 10} if name == 'cnn' else {'vocab_size': 259}
  model = models.build(config.model, **kwargs)
  x = (jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) if name == 'cnn'
       else jax.random.randint(jax.random.key(0), (4, 16), 0, 259))
  params = nn.unbox(model.init(jax.random.key(1), x, train=False))
  quiet = quantization.quantized_model(model, _q(modules='nothing_is_named_so', act_dtype='int8'))
  np.testing.assert_array_equal(quiet.apply(params, x, train=False), model.apply(params, x, train=False))


@pytest.mark.parametrize('n', [1, 2, 7, 64])
def test_int4_packs_two_to_a_byte_and_unpacks_to_the_same_values(n):
  values = np.random.default_rng(n).integers(-8, 8, (n, 3)).astype(np.int8)
  packed = quantization._pack_int4(values.astype(jnp.int4))  # pylint: disable=protected-access
  assert packed.dtype == np.uint8 and packed.shape == ((3 * n + 1) // 2,)
  np.testing.assert_array_equal(quantization._unpack_int4(packed, values.shape), values)  # pylint: disable=protected-access
  first, second = (int(v) for v in values.reshape(-1)[:2])
  assert packed[0] == (first & 0xF) | ((second & 0xF) << 4)   # low nibble first, two's complement


@pytest.mark.parametrize('weight_dtype', ['int8', 'int4'])
def test_stored_weights_load_back_bit_exactly_and_take_their_bytes(weight_dtype):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  _, float_params, abstract, qparams = _net(_q(weight_dtype=weight_dtype), x)
  stored = quantization.to_storage(jax.device_get(qparams))
  back = quantization.from_storage(stored, abstract)
  for a, b in zip(jax.tree.leaves(qparams), jax.tree.leaves(back)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
  assert quantization.stored_bytes(stored) == bytes_by_hand(float_params, weight_dtype)[0]


def test_gptq_beats_round_to_nearest_on_its_objective():
  """GPTQ minimises ||X W - X Q||^2 over the layer's inputs X: less than rounding each weight alone."""
  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.linear(32, 'block_0', use_bias=False)(x)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(512, 8)) @ rng.normal(size=(8, 64)) + 0.1 * rng.normal(size=(512, 64)),
                  jnp.float32)   # correlated inputs, where error compensation matters
  params = nn.unbox(Dense().init(jax.random.key(0), x))['params']
  q = _q(weight_dtype='int4', calibration='gptq')
  abstract = nn.unbox(jax.eval_shape(lambda: quantization.quantized_model(Dense(), q).init(jax.random.key(0), x))
                      )['params']
  calib = quantization.quantized_model(Dense(), q, quantization.GptqCalibration)
  stats = calib.apply({'params': params}, x, mutable=['quant_stats'])[1]['quant_stats']
  errors = {}
  for name, qp in [('gptq', quantization.gptq_quantize(params, abstract, stats)),
                   ('rtn', quantization.quantize(params, abstract))]:
    a = qp['block_0']['kernel'].array
    w_q = np.asarray(a.qvalue).astype(np.float64) * np.asarray(a.scale, np.float64)
    errors[name] = np.sum((np.asarray(x, np.float64) @ (np.asarray(params['block_0']['kernel'], np.float64) - w_q)) ** 2)
  assert errors['gptq'] < 0.8 * errors['rtn'], errors


def _expected_quantized(name, params) -> set:
  """The kernels the default `modules` picks, from the protocol's names: those inside a block_<i> (of the
  generator for the GAN; the recurrent matrix u of an RNN is used inside a scan and stays float)."""
  out = set()
  for path in traverse_util.flatten_dict(params):
    if path[-1] == 'kernel' and protocol.block_index(path) is not None and not protocol.is_lora(path):
      if name != 'dcgan' or path[0] == 'generator':
        out.add(path)
  return out



@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_ptq_of_every_family_quantizes_the_block_layers_and_stays_close_to_float(name):
  config = family_config(name)
  data = family_data(config)
  exp = build_experiment(config, data.info)
  state = exp.init_state()
  qconfig = ptq.inference_config(settings.with_scheme(config, 'int8'))
  qexp = ptq.quantized_experiment(qconfig, data.info, exp.mesh)
  float_vars = exp.task.variables(state)
  abstract = qexp.task.variables(qexp.abstract_state)
  qparams = jax.jit(lambda p: quantization.quantize(p, abstract['params']))(float_vars['params'])
  flat = traverse_util.flatten_dict(qparams, is_leaf=lambda _, v: isinstance(v, quantization.WithAux))
  assert {k for k, v in flat.items() if isinstance(v, quantization.WithAux)} == _expected_quantized(
      name, float_vars['params'])
  qvars = quantization.from_storage(quantization.to_storage(jax.device_get({**float_vars, 'params': qparams})),
                                    abstract)
  qstate = jax.jit(lambda v: qexp.task.with_variables(qexp.abstract_state, v), out_shardings=qexp.state_shardings)(
      qvars)
  batch = sharding.to_global(next(iter(pipeline.eval_batches(data, batch_size=config.batch_size, prefetch=0))),
                             exp.mesh)
  f, q = jax.jit(exp.task.eval_step)(state, batch), jax.jit(qexp.task.eval_step)(qstate, batch)
  for k in f:   # sums over the batch: int8 weights of a fresh model barely move them
    fk, qk = np.asarray(f[k], np.float64), np.asarray(q[k], np.float64)
    if np.all(fk == np.round(fk)):   # counts (correct, a confusion matrix): a near tie may flip a prediction
      assert np.abs(qk - fk).sum() <= 4, (k, qk, fk)
    else:
      np.testing.assert_allclose(qk, fk, rtol=0.02, atol=1e-3, err_msg=k)
