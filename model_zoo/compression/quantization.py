"""Integer quantization of any model through qwix: post-training (PTQ), GPTQ and quantization-aware
training (QAT), configured by `config.quantization` (see model_zoo.config.base_config; its checks are in
model_zoo.compression.settings).

Symmetric per-channel quantization (Jacob et al., 2018, "Quantization and training of neural networks
for efficient integer-arithmetic-only inference", with the zero point at 0): a weight column w (one
output channel, or one tile of `tile_size` inputs of it) is stored as
  q = round(w / s) clipped to [-2^(b-1), 2^(b-1) - 1],   s = max|w| / (2^(b-1) - 1/2)
with b = 8 or 4 bits (qwix's grid: the largest |w| falls on the edge of the top bucket), used as q * s. With `act_dtype='int8'` each row of a layer's input (a token
or an example) is quantized the same way when the layer runs (dynamic range), and the matmul is
done on the integers: y = (q_x q_w) s_x s_w.
GPTQ (Frantar et al., 2022) rounds the columns of a weight one after another, each time correcting
the columns not yet rounded for the error made, weighted by H = X X^T of the layer's inputs X on a
few calibration batches: it minimises ||W X - Q X||^2 rather than ||W - Q||.
QAT (Jacob et al., 2018, sec. 3) trains with the forward pass quantized (weights, and inputs when
asked) and gradients passed straight through the rounding, so that the weights learn to sit well on
the integer grid; PTQ of a QAT checkpoint with the same settings then computes the same function.

qwix intercepts the matmuls and convolutions of an unmodified flax model (`qwix.quantize_model`).
`modules` (a regex on module paths, qwix's `QuantizationRule.module_path`) picks the layers; by
default the dense and convolution layers inside the blocks (`block_<i>`, see
model_zoo.models.protocol): embeddings, the tied LM head and the task heads stay float unless asked.
Only matmuls with a weight operand are quantized (not attention's q k^T and p v, nor a recurrent
matrix applied inside a time scan: LSTM/GRU quantize their input projection W, not U).

Storage: qwix keeps an int4 value in a byte; `to_storage` packs two to a byte (low nibble first)
and `from_storage` unpacks them, so a saved int4 model takes half a byte per weight plus its scales.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix
from flax import traverse_util
from qwix._src.core import conv_general
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util
from qwix.contrib import calibration, gptq_core
from qwix.contrib import gptq as qwix_gptq

from model_zoo.compression.settings import DEFAULT_MODULES
from model_zoo.errors import UserError

QTYPES = {'none': None, 'int8': jnp.int8, 'int4': jnp.int4}   # the names of config.quantization's dtypes
WithAux = qwix_ptq.WithAux


def rules(q: ml_collections.ConfigDict, rule_type=qwix.QuantizationRule) -> list:
  return [rule_type(module_path=q.modules, weight_qtype=QTYPES[q.weight_dtype],
                    act_qtype=QTYPES[q.act_dtype], tile_size=q.tile_size or None,
                    weight_calibration_method='absmax')]


_qwix_find_param = flax_util.find_param


def _find_param(x, ptq_array_type=None) -> str | None:
  """The name of the running module's parameter that `x` is, or is computed from by unary operations
  (a cast, a reshape); None otherwise. qwix's own `find_param` also matches an array by its shape
  alone, which takes an activation of a kernel's shape (a batch of 32 into a 32-wide layer) for the kernel."""
  del ptq_array_type
  module = flax_util.get_current_module()
  names = {}
  for name, value in module.scope._collection('params').items():  # pylint: disable=protected-access
    value = flax_util.unbox(value)
    names[id(value.array if isinstance(value, WithAux) else value)] = name
  x = x.array if isinstance(x, WithAux) else x
  while True:
    if id(x) in names:
      return names[id(x)]
    parent = getattr(x, 'parent', None) if isinstance(x, jax.core.Tracer) else None
    if parent is not None and len(parent.in_tracers) == 1:
      x = parent.in_tracers[0]
    elif hasattr(x, 'get_const') and id(const := x.get_const()) in names:
      return names[id(const)]
    else:
      return None


class _StrictParams:
  """While a quantization provider handles an op, qwix identifies weights with `_find_param`."""

  def __enter__(self):
    flax_util.find_param = _find_param

  def __exit__(self, *exc):
    flax_util.find_param = _qwix_find_param


def _is_weight(x) -> bool:
  """Whether `x` is (derived from) a parameter of the module now running, or an already quantized one."""
  return isinstance(x, WithAux) or (isinstance(x, jax.Array) and _find_param(x) is not None)


def _initializing() -> bool:
  return flax_util.get_current_module().is_initializing()


class _WeightOps:
  """Quantize only the matmuls and convolutions that have a weight operand (found strictly)."""

  def dot_general(self, lhs, rhs, *args, **kwargs):
    if not (_is_weight(lhs) or _is_weight(rhs)):
      kwargs.pop('rule', None), kwargs.pop('op_id', None)   # GPTQ's calibration passes its own
      return jax.lax.dot_general(lhs, rhs, *args, **kwargs)
    with _StrictParams():
      return super().dot_general(lhs, rhs, *args, **kwargs)

  def einsum(self, spec, *operands, **kwargs):
    if not any(_is_weight(x) for x in operands):
      return jnp.einsum(spec, *operands, **kwargs)
    with _StrictParams():
      return super().einsum(spec, *operands, **kwargs)

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    with _StrictParams():
      return super().conv_general_dilated(lhs, rhs, *args, **kwargs)


class PtqProvider(_WeightOps, qwix.PtqProvider):
  """qwix's PTQ, with two additions for qwix 0.1.8:

  - weight-only convolutions: qwix quantizes a convolution's weights only together with its inputs;
    here float inputs meet the int weights, dequantized inside the convolution (as qwix does for
    dense layers);
  - a weight that was not quantized when the model was initialised (one used inside a scan, which
    qwix does not see at init) stays float when the model runs, instead of failing.
  """

  def dot_general(self, lhs, rhs, *args, **kwargs):
    if isinstance(rhs, jax.Array) and not _initializing() and _find_param(rhs) is not None:
      return jax.lax.dot_general(lhs, rhs, *args, **kwargs)
    return super().dot_general(lhs, rhs, *args, **kwargs)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None, out_sharding=None):
    conv = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count)
    rule, _ = self._get_current_rule_and_op_id('conv_general_dilated', only_rule=True)
    name = None if isinstance(rhs, WithAux) else _find_param(rhs)
    if rule is None or rule.weight_qtype is None or (name is None and not isinstance(rhs, WithAux)) or (
        name is not None and not _initializing()):
      return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                                          preferred_element_type=preferred_element_type, **conv)
    if rule.act_qtype is not None:
      return super().conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                                          preferred_element_type=preferred_element_type,
                                          out_sharding=out_sharding, **conv)
    if name is not None:
      how = conv_general.get_how_to_quantize(
          dimension_numbers=jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers),
          for_lhs=False, qtype=rule.weight_qtype, calibration_method=rule.weight_calibration_method)
      rhs = qwix_ptq.create_quantized_param(name, rhs, how)
    return qwix.conv_general_dilated(lhs, rhs.array, window_strides, padding, precision=precision, **conv)


class QtProvider(_WeightOps, qwix.QtProvider):
  """qwix's quantization-aware training on the same layers as PtqProvider."""


class GptqCalibration(_WeightOps, qwix_gptq.GptqCalibrationProvider):
  """Collects H = X X^T of each quantized dense layer's inputs into the 'quant_stats' collection."""


def _methods(model: nn.Module) -> list[str]:
  """The methods through which tasks apply a model (__call__, and encode, decode, generate ...)."""
  own = [n for c in type(model).__mro__ if c not in (nn.Module, object) and issubclass(c, nn.Module)
         for n, v in vars(c).items() if callable(v) and not n.startswith('_') and n != 'setup']
  return ['__call__', *dict.fromkeys(own)]


def quantized_model(model: nn.Module, q: ml_collections.ConfigDict, provider_type=None) -> nn.Module:
  """`model` with qwix intercepting its layers: PTQ when q.mode is 'ptq', QAT when 'qat' (or the
  given provider type). The provider is kept on the model (`provider(model)`)."""
  if provider_type is None:
    provider_type = {'ptq': PtqProvider, 'qat': QtProvider}[q.mode]
  rule_type = qwix_gptq.GptqRule if provider_type is GptqCalibration else qwix.QuantizationRule
  provider = provider_type(rules(q, rule_type))
  out = qwix.quantize_model(model, provider, methods=_methods(model))
  object.__setattr__(out, '_quantization_provider', provider)
  return out


def provider(model: nn.Module):
  return getattr(model, '_quantization_provider', None)


def check_matched(model: nn.Module, q: ml_collections.ConfigDict, abstract_params=None):
  """A UserError when `q.modules` selected no layer of `model` (after it was initialised, or traced)."""
  p = provider(model)
  unused = p is not None and p._initial_run_complete and p.get_unused_rules()  # pylint: disable=protected-access
  quantized = abstract_params is None or any(isinstance(x, WithAux) for x in jax.tree.leaves(
      abstract_params, is_leaf=lambda x: isinstance(x, WithAux)))
  if unused or not quantized:
    raise UserError(f'config.quantization.modules={q.modules!r} matches no dense or convolution layer of this '
                    f'{type(model).__name__} (its parameters are at paths such as '
                    f'{", ".join(_example_paths(abstract_params))}); give a regex of module paths, e.g. the '
                    f'default {DEFAULT_MODULES!r}')


def _example_paths(params, n: int = 3) -> list[str]:
  if params is None:
    return ['block_0/...']
  flat = traverse_util.flatten_dict(nn.unbox(params), is_leaf=lambda _, x: isinstance(x, WithAux))
  return list(dict.fromkeys('/'.join(k[:-1]) for k in flat))[:n]


def gptq_quantize(params, abstract_params, stats, block_size: int = 128, damping: float = 0.01):
  """GPTQ-rounded int weights where calibration statistics exist (dense layers), absmax elsewhere.

  As qwix.contrib.gptq.quantize_params, but each weight's GPTQ (a loop over its columns) is compiled
  once per shape and setting, not run op by op: the blocks of a model share their shapes."""
  compiled = {}

  def quantize_weight(ctx):
    key = (ctx.weight.shape, repr(ctx.how))
    if key not in compiled:
      how = ctx.how
      compiled[key] = jax.jit(lambda w, h: gptq_core.quantize_weight(w, h, how, block_size, damping)[0])
    with jax.numpy_rank_promotion('allow'):   # qwix's GPTQ broadcasts a vector against a matrix
      w = compiled[key](ctx.weight, ctx.calibration_stats['hessian'])
    return ctx.abs_w.replace(array=ctx.restore_shape(w))
  return calibration.quantize_params_with_calibration(params, abstract_params, stats, '_gptq', quantize_weight)


def quantize(params, abstract_params):
  """The float `params` rounded as `abstract_params` (a PTQ model's initialised, or traced, params) says."""
  return qwix.quantize_params(params, abstract_params)


# Storage: a quantized weight as {'qvalue': int8 (or int4 packed into uint8), 'scale': float}.

def _pack_int4(q) -> np.ndarray:
  flat = np.asarray(q).astype(np.int8).reshape(-1)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.int8)])
  nibbles = flat.astype(np.uint8) & 0xF
  return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack_int4(packed, shape) -> jax.Array:
  """The inverse of `_pack_int4`, in jax.numpy: an exported program unpacks its int4 weights itself."""
  packed = jnp.asarray(packed, jnp.uint8)
  nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(jnp.int8)
  values = jnp.where(nibbles >= 8, nibbles - 16, nibbles).astype(jnp.int8)   # two's complement of 4 bits
  return values[:math.prod(shape)].reshape(shape)


def _is_q(x) -> bool:
  return isinstance(x, WithAux)


def to_storage(params):
  """Quantized params as plain arrays: each WithAux leaf becomes {'qvalue', 'scale'}, int4 packed
  (works on jax.ShapeDtypeStruct leaves too, for the shapes of what is stored)."""
  def store(x):
    if not _is_q(x):
      return x
    qa = x.array
    if qa.zero_point is not None:
      raise ValueError('asymmetric quantization is not stored')
    qvalue = qa.qvalue
    if jnp.dtype(qvalue.dtype) == jnp.int4:
      n = (math.prod(qvalue.shape) + 1) // 2
      qvalue = (jax.ShapeDtypeStruct((n,), jnp.uint8) if isinstance(qvalue, jax.ShapeDtypeStruct)
                else _pack_int4(qvalue))
    return {'qvalue': qvalue, 'scale': qa.scale}
  return jax.tree.map(store, params, is_leaf=_is_q)


def from_storage(stored, abstract_params):
  """The inverse of `to_storage`: WithAux leaves rebuilt on `abstract_params`' structure and settings."""
  def load(abstract, s):
    if not _is_q(abstract):
      return jnp.asarray(s)
    qvalue = s['qvalue']
    if jnp.dtype(abstract.array.qvalue.dtype) == jnp.int4:
      qvalue = _unpack_int4(qvalue, abstract.array.qvalue.shape).astype(jnp.int4)
    qa = abstract.array.replace(qvalue=jnp.asarray(qvalue, abstract.array.qvalue.dtype), scale=jnp.asarray(s['scale']))
    return abstract.replace(array=qa)
  return jax.tree.map(load, abstract_params, stored, is_leaf=_is_q)


def stored_bytes(tree) -> int:
  """Bytes of every array in a (stored) tree."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def quantized_layer_bytes(params) -> tuple[int, int]:
  """(bytes as stored, bytes in float) of the quantized weights of `params` alone."""
  q = [x for x in jax.tree.leaves(params, is_leaf=_is_q) if _is_q(x)]
  stored = stored_bytes([to_storage(x) for x in q])
  return stored, int(sum(math.prod(x.shape) * jnp.dtype(x.array.scale.dtype).itemsize for x in q))
