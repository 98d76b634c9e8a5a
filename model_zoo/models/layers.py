"""Shared Transformer parts, written once for GPT, the translation Transformer, BERT and ViT.

Vaswani et al. (2017), "Attention Is All You Need":
  Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                                       (eq. 1)
  MultiHead(x) = Concat(head_1..head_h) W^O,  head_i = Attention(x W_i^Q, x W_i^K, x W_i^V)
  FFN(x) = max(0, x W_1 + b_1) W_2 + b_2                                                 (eq. 2)
  PE(pos, 2i) = sin(pos / 10000^(2i/d)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
Grouped-query attention (Ainslie et al., 2023): `num_kv_heads` key/value heads shared by groups
of query heads. Rotary positions (Su et al., 2021, RoFormer): q and k rotated by position-dependent
angles, so q.k depends on relative position. SwiGLU (Shazeer, 2020): (Swish(x W) * x V) W_2.
LoRA (Hu et al., 2021): a frozen projection W gains a trainable low-rank update,
  h = x W + (alpha / r) x A B,  A: [in, r], B: [r, out] initialised to zero (so training starts at W).
Pre-LN (Xiong et al., 2020): x + F(LN(x)); post-LN (the original): LN(x + F(x)).

Also the plain layers of the other families (`linear`, `conv`, `batch_norm`). Every parameter
carries logical axis names (embed, mlp, heads, kv, vocab): the mesh layout is a rule table in
model_zoo.training.sharding. Shape letters as in the README's legend (T query length, S key length,
N query heads, K key/value heads, E head dim, F d_ff).
"""
import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
logical = nn.with_logical_partitioning

# The choices of the options the families share. A model field typed with one of these (or with any
# Literal) is checked by model_zoo.models.registry before anything is built or read: a misspelt value
# is an error that lists the choices, never a silent default.
Activation = Literal['gelu', 'gelu_exact', 'relu', 'swiglu']
ComputeDtype = Literal['float32', 'bfloat16', 'float16']     # parameters stay float32
AttentionImpl = Literal['', 'xla', 'cudnn']                   # '': XLA
RematPolicy = Literal['none', 'full', 'dots', 'qkv', 'attention', 'attention_mlp']


# (mesh, rules) while a step is traced under model_zoo.training.sharding.constrained; None elsewhere.
_ACTIVATION_SHARDING = contextvars.ContextVar('model_zoo activation sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
  """Inside, `constrain` places activations on `mesh` by the logical-axis `rules`."""
  token = _ACTIVATION_SHARDING.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x, *names: str | None):
  """x, constrained to the mesh axes its activations' axis names map to (model_zoo.training.sharding.RULES) where
  a step is traced under activation_sharding; elsewhere x unchanged."""
  current = _ACTIVATION_SHARDING.get()
  if current is None:
    return x
  mesh, rules = current
  spec = nn.logical_to_mesh_axes(names, rules)
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


BxTxD = ('activation_batch', 'activation_length', 'activation_embed')   # the names of a block's input and output


# Plain layers for the families without attention: kernels [in, out] named ('embed', 'mlp') and
# convolution kernels [kh, kw, in, out] named (None, None, None, 'embed'), so that FSDP shards
# their input features or output channels (see model_zoo.training.sharding).

_DOT_GENERAL_CODE = jax.lax.dot_general.__code__   # qwix intercepts dot_general by replacing its code


def _cpu_forms() -> bool:
  """Whether `matmul` and `LayerNorm` take their written-out backward passes: on the CPU, and not while qwix
  intercepts dot_general (quantization: its integer or fake-quantized dots and their gradients are qwix's)."""
  return jax.default_backend() == 'cpu' and jax.lax.dot_general.__code__ is _DOT_GENERAL_CODE


def matmul(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """jax.lax.dot_general as the dense layers call it (inputs [..., in] times a kernel [in..., out...]), with the
  backward pass laid out for XLA's CPU compiler.

  The gradients are the usual ones, dx = dy W^T and dW = x^T dy, written out (`_matmul_bwd`) in the forms
  XLA:CPU runs fastest. From autodiff it computes the MLP kernels' dW as plain (Eigen) dots that contract the
  leading axis of both operands, one of them first copied to a transposed layout, and its thread pool runs
  them outside the profiled operations; [2048, 1024]^T [2048, 256] takes 9.1 ms that way against 5.8 for
  [2048, 256]^T [2048, 1024] on this repository's 2-core test machine. Here dW is always the product whose
  output has the smaller dimension first: for a kernel wider in than out (the MLP's [d_ff, d] output
  projection) it is computed as dW^T and transposed, an optimization barrier keeping XLA from folding the
  transpose back into the dot. GPT's train step at benchmarks/gpt_vs_pytorch.py's shape a: 478 against 523 ms,
  interleaved in one process (benchmarks/README.md).
  Elsewhere it is jax.lax.dot_general itself: off the CPU (GPU and TPU compilers pick the layouts of a
  dot's operands themselves), for other dimension numbers, and while qwix intercepts dot_general
  (quantization: its integer or fake-quantized dots and their gradients are qwix's)."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  n = len(lhs_contract)
  if (not _cpu_forms() or batch != ((), ())
      or preferred_element_type is not None or kwargs or not isinstance(lhs, jax.Array)
      or not isinstance(rhs, jax.Array) or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  return _matmul(lhs, rhs, n, precision)


def _contract(a, b, i: int, j: int, precision=None):
  """The product of two matrices over a's axis i and b's axis j (the written-out backward passes' one form)."""
  return jax.lax.dot_general(a, b, (((i,), (j,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, n: int, precision):
  """x [..., in...] . w [in..., out...] over the n axes of `in`."""
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
                             precision=precision)


def _matmul_fwd(x, w, n, precision):
  return _matmul(x, w, n, precision), (x, w)


def _matmul_bwd(n, precision, residuals, dy):
  x, w = residuals
  k, m = math.prod(w.shape[:n]), math.prod(w.shape[n:])
  x_RxK, w_KxM, dy_RxM = x.reshape(-1, k), w.reshape(k, m), dy.reshape(-1, m)
  dx = _contract(dy_RxM, w_KxM, 1, 1, precision)
  if k <= m:
    dw_KxM = _contract(x_RxK, dy_RxM, 0, 0, precision)
  else:
    dw_KxM = jax.lax.optimization_barrier(_contract(dy_RxM, x_RxK, 0, 0, precision)).T
  return dx.reshape(x.shape).astype(x.dtype), dw_KxM.reshape(w.shape).astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear(features: int, name: str | None = None, *, use_bias: bool = True, axes: tuple = ('embed', 'mlp'),
           kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros_init(), dtype=None):
  """nn.Dense with logically named kernel [in, out] and bias [out]."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, kernel_init=logical(kernel_init, axes),
                  bias_init=logical(bias_init, axes[-1:]), dot_general=matmul)


def conv(features: int, kernel_size, strides=1, padding='SAME', *, name: str | None = None, use_bias: bool = True,
         transpose: bool = False, kernel_init=nn.initializers.lecun_normal()):
  """nn.Conv (or nn.ConvTranspose) with logically named kernel [kh, kw, in, out] and bias [out]."""
  kernel_size = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
  strides = tuple(strides) if isinstance(strides, (tuple, list)) else (strides, strides)
  axes = (None,) * (len(kernel_size) + 1) + ('embed',)
  cls = nn.ConvTranspose if transpose else nn.Conv
  return cls(features, kernel_size, strides, padding=padding, use_bias=use_bias, name=name,
             kernel_init=logical(kernel_init, axes), bias_init=logical(nn.initializers.zeros_init(), ('embed',)))


def batch_norm(*, train: bool, momentum: float = 0.9, epsilon: float = 1e-5, scale_init=nn.initializers.ones_init(),
               name: str | None = None):
  """nn.BatchNorm over the last axis; scale and bias named ('embed',), running averages in 'batch_stats'."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, name=name,
                      scale_init=logical(scale_init, ('embed',)),
                      bias_init=logical(nn.initializers.zeros_init(), ('embed',)))


# Transformer parts.

def dense(features, axes: tuple, *, in_axes: int | tuple = -1, use_bias: bool, dtype: Dtype, name: str | None,
          kernel_axes: tuple):
  """A DenseGeneral whose kernel (and bias) carry logical axis names."""
  return nn.DenseGeneral(
      features, axis=in_axes, use_bias=use_bias, dtype=dtype, name=name,
      kernel_init=logical(nn.initializers.xavier_uniform(), kernel_axes),
      bias_init=logical(nn.initializers.zeros_init(), axes), dot_general=matmul)


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-5):
  """LayerNorm computed in float32 whatever the compute dtype, output cast to `dtype`."""
  return LayerNorm(dtype=dtype, epsilon=epsilon, name=name)


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al., 2016) over the last axis, in float32 whatever the compute dtype:
    y = (x - mean) / sqrt(var + epsilon) * scale + bias,
  parameters `scale` and `bias` [D] as flax's nn.LayerNorm names them. On the CPU its backward pass is written
  out (`_layer_norm`); elsewhere, and under qwix (`_cpu_forms`), it is JAX's derivative of the formula."""
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', logical(nn.initializers.ones_init(), ('embed',)), (d,), jnp.float32)
    bias = self.param('bias', logical(nn.initializers.zeros_init(), ('embed',)), (d,), jnp.float32)
    x = x.astype(_at_least_f32(x.dtype))
    y = (_layer_norm if _cpu_forms() else _layer_norm_formula)(x, scale, bias, self.epsilon)
    return y.astype(self.dtype)


def _layer_norm_formula(x, scale, bias, epsilon):
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
  """LayerNorm with the backward pass of its equations, x^ = (x - mean) r, r = 1 / sqrt(var + epsilon),
  g = dy * scale:  dx = r (g - mean(g) - x^ mean(g x^)),  dscale = sum(dy x^),  dbias = sum(dy),
  every sum a matrix-vector product (what XLA:CPU's autodiff form runs as broadcasts written to memory
  and reductions over them; GPT's `small` shape on the 2-core test machine: benchmarks/README.md). Dots, not
  reductions: written as reductions, XLA:CPU's YNNPACK fusions computed them wrongly under vmap (same file)."""
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
  centered = x - jnp.mean(x, axis=-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
  x_hat = centered * r
  row = lambda v: v.astype(x.dtype).reshape((1,) * (x.ndim - 1) + v.shape)
  return x_hat * row(scale) + row(bias), (x_hat, r, scale)


def _layer_norm_backward(epsilon, residuals, dy):
  x_hat, r, scale = residuals
  d = x_hat.shape[-1]
  x_hat_RxD, dy_RxD = x_hat.reshape(-1, d), dy.reshape(-1, d).astype(x_hat.dtype)
  scale_D = scale.astype(x_hat.dtype)
  dy_x_hat_RxD = dy_RxD * x_hat_RxD
  mean_g_Rx1 = _contract(dy_RxD, scale_D / d, 1, 0)[:, None]
  mean_g_x_hat_Rx1 = _contract(dy_x_hat_RxD, scale_D / d, 1, 0)[:, None]
  ones_R = jnp.ones(dy_RxD.shape[:1], x_hat.dtype)
  d_scale, d_bias = _contract(ones_R, dy_x_hat_RxD, 0, 0), _contract(ones_R, dy_RxD, 0, 0)
  dx_RxD = r.reshape(-1, 1) * (dy_RxD * scale_D[None] - mean_g_Rx1 - x_hat_RxD * mean_g_x_hat_Rx1)
  return dx_RxD.reshape(x_hat.shape), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def sinusoidal_positions(positions_BxT: jax.Array, d_model: int) -> jax.Array:
  """The fixed sinusoidal encoding of Vaswani et al., at arbitrary (e.g. packed) positions."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2) / d_model))
  angles_BxTxD2 = jnp.einsum('bt,f->btf', positions_BxT.astype(jnp.float32), inv_freq.astype(np.float32))
  out = jnp.zeros(positions_BxT.shape + (d_model,), jnp.float32)
  return out.at[..., 0::2].set(jnp.sin(angles_BxTxD2)).at[..., 1::2].set(jnp.cos(angles_BxTxD2))


def apply_rotary(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, base: float = 10000.0) -> jax.Array:
  """RoFormer's rotation: pairs (x_i, x_{i+E/2}) rotated by angle pos * base^(-2i/E)."""
  e = x_BxTxNxE.shape[-1]
  inv_freq = 1.0 / (base ** (np.arange(0, e, 2) / e))
  angles_BxTx1xE2 = jnp.einsum('bt,f->btf', positions_BxT.astype(jnp.float32),
                               inv_freq.astype(np.float32))[:, :, None, :]
  sin, cos = jnp.sin(angles_BxTx1xE2), jnp.cos(angles_BxTx1xE2)
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxE.dtype)


@struct.dataclass
class Mask:
  """Which keys each query may attend to, as the kernels take it (no dense [B, T, S] array unless asked for).

  causal: query t reads keys s <= t (self-attention, T == S).
  q_segments_BxT / kv_segments_BxS: segment ids number the documents packed into a row, 0 marks padding; a query
    reads the keys of its own segment (with kv segments alone: every key whose segment is not 0).
  kv_lengths_B: row b reads its first kv_lengths_B[b] keys (right padding: BERT).
  explicit_Bx1xTxS: a boolean mask as it is (a decoder's cache).
  Every part given must hold; with none, every query reads every key.
  """
  causal: bool = struct.field(pytree_node=False, default=False)
  q_segments_BxT: jax.Array | None = None
  kv_segments_BxS: jax.Array | None = None
  kv_lengths_B: jax.Array | None = None
  explicit_Bx1xTxS: jax.Array | None = None

  def rows(self, lo: int, hi: int, s: int):
    """The boolean mask [B or 1, 1, hi - lo, s] of queries lo..hi-1 over keys 0..s-1, or None for no mask."""
    parts = []
    if self.causal:
      parts.append((jnp.arange(lo, hi)[:, None] >= jnp.arange(s)[None, :])[None, None])
    kv_BxS = None if self.kv_segments_BxS is None else self.kv_segments_BxS[:, :s]
    if self.q_segments_BxT is not None:
      q_BxC = self.q_segments_BxT[:, lo:hi]
      kv_BxS = self.q_segments_BxT[:, :s] if kv_BxS is None else kv_BxS   # self-attention
      parts.append(((q_BxC[:, :, None] == kv_BxS[:, None, :]) & (kv_BxS[:, None, :] != 0))[:, None])
    elif kv_BxS is not None:
      parts.append((kv_BxS != 0)[:, None, None, :])
    if self.kv_lengths_B is not None:
      parts.append(jnp.arange(s)[None, None, None, :] < self.kv_lengths_B[:, None, None, None])
    if self.explicit_Bx1xTxS is not None:
      parts.append(self.explicit_Bx1xTxS[:, :, lo:hi, :s])
    return functools.reduce(jnp.logical_and, parts) if parts else None

  def dense(self, t: int, s: int):
    """The whole mask [B or 1, 1, T, S] (None for no mask)."""
    return self.rows(0, t, s)


def causal_blocks(t: int, s: int) -> int:
  """How many blocks of queries causal self-attention splits T into, each reading only the keys up to its last
  query: 1 - (n + 1) / 2n of the logits are never computed (3/8 for 4 blocks). Blocks of at least 64 rows,
  at most 8 of them (T = 128: 2, 256: 4, 1024: 8)."""
  if t != s:
    return 1
  return next((n for n in (8, 4, 2) if t % n == 0 and t // n >= 64), 1)


def dot_product_attention(q_BxTxNxE, k_BxSxKxE, v_BxSxKxE, mask: 'Mask | None' = None,
                          implementation: str | None = None, kv_heads_first: bool = False):
  """softmax(q k^T / sqrt(E), masked) v  [B, T, N, E]; query head n reads key head n // (N / K).

  `kv_heads_first`: keys and values come as [B, K, S, E], the layout of a decoder's cache, which is the layout
  the XLA kernel's batched matmuls read (given [B, S, K, E], the whole cache would be transposed every step).

  'cudnn': jax.nn.dot_product_attention's fused kernel (GPU), causality as `is_causal` (it skips the blocks above
  the diagonal), right padding as sequence lengths, segments as a segment-only boolean mask.
  Otherwise (None, 'xla'): `_attention` below, in XLA. A query that may read no key at all (padding) gets the
  mean of the values. 'dense' is the formula as written, every logit computed: what
  protocol.flops_per_example counts (all T x S logits, the convention of PaLM's MFU), never a config's choice.
  """
  mask = Mask() if mask is None else mask
  if kv_heads_first and implementation in ('dense', 'cudnn'):
    k_BxSxKxE, v_BxSxKxE = k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)
  if implementation == 'dense':
    n, k_heads = q_BxTxNxE.shape[2], k_BxSxKxE.shape[2]
    k_BxSxNxE, v_BxSxNxE = (jnp.repeat(x, n // k_heads, axis=2) for x in (k_BxSxKxE, v_BxSxKxE))
    p_BxNxTxS = attention_probabilities(q_BxTxNxE, k_BxSxNxE, mask.dense(q_BxTxNxE.shape[1], k_BxSxKxE.shape[1]))
    return jnp.einsum('bnts,bsne->btne', p_BxNxTxS.astype(v_BxSxNxE.dtype), v_BxSxNxE)
  if implementation == 'cudnn':
    rest = mask.replace(causal=False, kv_lengths_B=None).dense(q_BxTxNxE.shape[1], k_BxSxKxE.shape[1])
    lengths = None if mask.kv_lengths_B is None else mask.kv_lengths_B.astype(jnp.int32)
    return jax.nn.dot_product_attention(q_BxTxNxE, k_BxSxKxE, v_BxSxKxE, mask=rest, is_causal=mask.causal,
                                        key_value_seq_lengths=lengths, implementation='cudnn')
  b, t, n, e = q_BxTxNxE.shape
  k_BxKxSxE, v_BxKxSxE = ((k_BxSxKxE, v_BxSxKxE) if kv_heads_first
                          else (k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)))
  k_heads = k_BxKxSxE.shape[1]
  # Heads first, each key head with its group of G = N / K query heads (no copies of the keys).
  q_BxKxGxTxE = (q_BxTxNxE * jnp.asarray(e ** -0.5, q_BxTxNxE.dtype)).reshape(
      b, t, k_heads, n // k_heads, e).transpose(0, 2, 3, 1, 4)
  out_BxKxGxTxE = _attention(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask)
  return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(b, t, n, e)


def _query_blocks(t: int, s: int, mask: Mask):
  """(first query, end, keys read) of each block of queries: causal self-attention reads only the keys up to each
  block's last query (causal_blocks)."""
  blocks = causal_blocks(t, s) if mask.causal else 1
  c = t // blocks
  return [(i * c, (i + 1) * c, s if blocks == 1 else (i + 1) * c) for i in range(blocks)]


def _logits(q_BxKxGxCxE, k_BxKxSxE, mask: Mask, lo: int, hi: int):
  """Masked logits [B, K, G, C, S] in float32 of the queries lo..hi-1 (q already scaled by 1 / sqrt(E))."""
  f32 = _at_least_f32(q_BxKxGxCxE.dtype)
  logits = jnp.einsum('bkgte,bkse->bkgts', q_BxKxGxCxE, k_BxKxSxE, preferred_element_type=f32)
  m_Bx1xCxS = mask.rows(lo, hi, k_BxKxSxE.shape[2])
  return logits if m_Bx1xCxS is None else jnp.where(m_Bx1xCxS[:, :, None], logits, jnp.finfo(f32).min)


def _at_least_f32(dtype):
  """The dtype attention's logits and sums are kept in: float32 for bfloat16/float16/float32 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


@jax.custom_vjp
def _attention(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask: Mask):
  """Attention over scaled queries, keeping only the output and each query's log-sum-exp for the backward pass,
  as FlashAttention does (Dao et al., 2022; Dao, 2023: the backward pass of FlashAttention-2), not the [T, S]
  probabilities: they are recomputed from the logits, P = exp(L - lse), and then
    dV = P^T dO,  dP = dO V^T,  dL = P * (dP - rowsum(dO * O)),  dQ = dL K,  dK = dL^T Q."""
  return _attention_forward(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask)[0]


def _attention_forward(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask):
  outs, lses = [], []
  for lo, hi, keys in _query_blocks(q_BxKxGxTxE.shape[3], k_BxKxSxE.shape[2], mask):
    logits = _logits(q_BxKxGxTxE[:, :, :, lo:hi], k_BxKxSxE[:, :, :keys], mask, lo, hi)
    max_ = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - max_)
    sum_ = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum('bkgts,bkse->bkgte', p.astype(v_BxKxSxE.dtype), v_BxKxSxE[:, :, :keys],
                   preferred_element_type=p.dtype)
    outs.append((o / sum_).astype(v_BxKxSxE.dtype))
    lses.append((max_ + jnp.log(sum_))[..., 0])
  out_BxKxGxTxE = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  lse_BxKxGxT = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=3)
  # Named, so that a remat policy that saves 'attention' keeps what the backward pass reads, not the whole kernel.
  out_BxKxGxTxE, lse_BxKxGxT = checkpoint_name(out_BxKxGxTxE, 'attention'), checkpoint_name(lse_BxKxGxT, 'attention')
  return out_BxKxGxTxE, (q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask, out_BxKxGxTxE, lse_BxKxGxT)


def _attention_backward(residuals, d_out_BxKxGxTxE):
  q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, mask, out_BxKxGxTxE, lse_BxKxGxT = residuals
  f32 = _at_least_f32(q_BxKxGxTxE.dtype)
  delta_BxKxGxT = jnp.sum(d_out_BxKxGxTxE.astype(f32) * out_BxKxGxTxE.astype(f32), axis=-1)
  dq, dk, dv = [], jnp.zeros(k_BxKxSxE.shape, f32), jnp.zeros(v_BxKxSxE.shape, f32)
  for lo, hi, keys in _query_blocks(q_BxKxGxTxE.shape[3], k_BxKxSxE.shape[2], mask):
    q, do = q_BxKxGxTxE[:, :, :, lo:hi], d_out_BxKxGxTxE[:, :, :, lo:hi]
    k, v = k_BxKxSxE[:, :, :keys], v_BxKxSxE[:, :, :keys]
    p = jnp.exp(_logits(q, k, mask, lo, hi) - lse_BxKxGxT[:, :, :, lo:hi, None])
    dv = dv.at[:, :, :keys].add(jnp.einsum('bkgts,bkgte->bkse', p.astype(do.dtype), do, preferred_element_type=f32))
    dp = jnp.einsum('bkgte,bkse->bkgts', do, v, preferred_element_type=f32)
    dl = (p * (dp - delta_BxKxGxT[:, :, :, lo:hi, None])).astype(q.dtype)
    dq.append(jnp.einsum('bkgts,bkse->bkgte', dl, k, preferred_element_type=f32))
    dk = dk.at[:, :, :keys].add(jnp.einsum('bkgts,bkgte->bkse', dl, q, preferred_element_type=f32))
  dq_BxKxGxTxE = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
  return dq_BxKxGxTxE.astype(q_BxKxGxTxE.dtype), dk.astype(k_BxKxSxE.dtype), dv.astype(v_BxKxSxE.dtype), None


_attention.defvjp(_attention_forward, _attention_backward)


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-query) dot-product attention, self or cross, with an optional KV cache.

  The kernel is `dot_product_attention` above: XLA ('xla' or None) or the fused cuDNN kernel on GPU
  ('cudnn'); `mask` (a Mask) says which keys each query reads. In `decode` mode the keys and values
  of earlier calls are kept in the 'cache' collection (see protocol.init_cache), so a sequence is
  processed a token (or a prompt) at a time at the cost of one new row each step.
  `use_bias` adds biases to the four projections (BERT, GPT-2, ViT); `lora_rank` > 0 adds LoRA
  adapters to each of them, as sibling parameters `<proj>_lora_a` and `<proj>_lora_b`. Applied with
  mutable=['intermediates'], it also sows its attention probabilities [B, N, T, S]
  (`attention_probabilities`, recomputed beside the fused kernel) for model_zoo.interpret.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  rotary: bool = False
  dtype: Dtype = jnp.float32
  implementation: str | None = None
  decode: bool = False
  use_bias: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x_BxTxD, kv_BxSxD=None, *, mask: Mask | None = None, positions_BxT=None,
               kv_positions_BxS=None, segment_ids_BxT=None):
    n, e = self.num_heads, self.head_dim
    k_heads = self.num_kv_heads or n
    d = x_BxTxD.shape[-1]
    self_attention = kv_BxSxD is None
    kv_BxSxD = x_BxTxD if self_attention else kv_BxSxD

    def project(x, features, axes, name, in_axes=-1, kernel_axes=('embed', 'heads', 'kv')):
      y = dense(features, axes, in_axes=in_axes, use_bias=self.use_bias, dtype=self.dtype, name=name,
                kernel_axes=kernel_axes)(x)
      if self.lora_rank:
        n_in = 1 if in_axes == -1 else len(in_axes)
        a = nn.DenseGeneral(self.lora_rank, axis=in_axes, use_bias=False, dtype=self.dtype,
                            name=f'{name}_lora_a', kernel_init=logical(
                                nn.initializers.he_uniform(in_axis=tuple(range(n_in)), out_axis=-1),
                                kernel_axes[:n_in] + (None,)))
        b = nn.DenseGeneral(features, use_bias=False, dtype=self.dtype, name=f'{name}_lora_b',
                            kernel_init=logical(nn.initializers.zeros_init(), (None,) + kernel_axes[n_in:]))
        y = y + b(a(x)) * (self.lora_alpha / self.lora_rank)
      return y

    heads = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
    q_BxTxNxE = checkpoint_name(constrain(project(x_BxTxD, (n, e), ('heads', 'kv'), 'query'), *heads), 'query')
    k_BxSxKxE = checkpoint_name(constrain(project(kv_BxSxD, (k_heads, e), ('heads', 'kv'), 'key'), *heads), 'key')
    v_BxSxKxE = checkpoint_name(constrain(project(kv_BxSxD, (k_heads, e), ('heads', 'kv'), 'value'), *heads),
                                'value')
    if self.rotary:
      q_BxTxNxE = apply_rotary(q_BxTxNxE, positions_BxT)
      k_BxSxKxE = apply_rotary(k_BxSxKxE, positions_BxT if self_attention else kv_positions_BxS)

    cached = self.decode and self_attention
    if cached:   # keys and values of the whole cache, heads first: [B, K, S, E]
      k, v, cache_mask = self._update_cache(k_BxSxKxE, v_BxSxKxE, positions_BxT, segment_ids_BxT)
      mask = Mask(explicit_Bx1xTxS=cache_mask)   # the cache's mask holds causality and padding
    else:
      k, v = k_BxSxKxE, v_BxSxKxE
    out_BxTxNxE = checkpoint_name(dot_product_attention(q_BxTxNxE, k, v, mask, self.implementation,
                                                        kv_heads_first=cached), 'attention')
    if self.is_mutable_collection('intermediates'):
      # Asked for (model.apply(..., mutable=['intermediates']): model_zoo.interpret), never in training or
      # init: the probabilities the fused kernel keeps inside, recomputed here.
      k_BxSxKxE = k.transpose(0, 2, 1, 3) if cached else k
      self.sow('intermediates', 'attention_probabilities', attention_probabilities(
          q_BxTxNxE, k_BxSxKxE, None if mask is None else mask.dense(q_BxTxNxE.shape[1], k_BxSxKxE.shape[1])))
    return project(out_BxTxNxE, d, ('embed',), 'out', in_axes=(-2, -1), kernel_axes=('heads', 'kv', 'embed'))

  def _update_cache(self, k_BxTxKxE, v_BxTxKxE, positions_BxT, segment_ids_BxT):
    """Writes this call's T keys/values at each row's cache index; returns the whole cache [B, K, S, E] (heads
    first, as the attention kernel reads it) and its mask.

    Each row has its own index (the slots it has filled), so rows of one cache may be at different points of
    their sequences, as the slots of continuous batching are. Attention reads the positions kept with the keys,
    not the slots: a padded slot (segment id 0) holds position 0 and is never attended to."""
    b, t, k_heads, e = k_BxTxKxE.shape
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, (b, k_heads, t, e), k_BxTxKxE.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, (b, k_heads, t, e), v_BxTxKxE.dtype)
    # Positions + 1 of the cached keys; 0 marks an empty slot or padding, so a zero cache is empty.
    cached_pos = self.variable('cache', 'positions_plus_1', jnp.zeros, k_BxTxKxE.shape[:2], jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((b,), jnp.int32))
    if self.is_initializing():  # init only creates the cache, at full length
      return cached_k.value, cached_v.value, None
    valid_BxT = jnp.ones(positions_BxT.shape, bool) if segment_ids_BxT is None else segment_ids_BxT != 0
    i_B = index.value
    rows_Bx1 = jax.lax.broadcasted_iota(jnp.int32, (b, 1), 0)
    slots_BxT = i_B[:, None] + jax.lax.broadcasted_iota(jnp.int32, (1, t), 1)
    # [rows, :, slots] of the [B, K, S, E] cache is the [B, T, K, E] the projections give (NumPy's indexing).
    cached_k.value = cached_k.value.at[rows_Bx1, :, slots_BxT].set(k_BxTxKxE, mode='promise_in_bounds')
    cached_v.value = cached_v.value.at[rows_Bx1, :, slots_BxT].set(v_BxTxKxE, mode='promise_in_bounds')
    cached_pos.value = cached_pos.value.at[rows_Bx1, slots_BxT].set(
        jnp.where(valid_BxT, positions_BxT + 1, 0).astype(jnp.int32), mode='promise_in_bounds')
    index.value = i_B + t
    kp_Bx1xS = cached_pos.value[:, None, :]
    mask_BxTxS = (kp_Bx1xS > 0) & (kp_Bx1xS <= positions_BxT[:, :, None] + 1)
    return cached_k.value, cached_v.value, mask_BxTxS[:, None]


def attention_probabilities(q_BxTxNxE, k_BxSxKxE, mask_Bx1xTxS=None):
  """softmax(q k^T / sqrt(E), masked) [B, N, T, S] in float32, what dot_product_attention computes
  before it multiplies by v: query head n reads key head n // (N / K); a fully masked row is uniform."""
  n, k_heads, e = q_BxTxNxE.shape[2], k_BxSxKxE.shape[2], q_BxTxNxE.shape[3]
  k_BxSxNxE = jnp.repeat(k_BxSxKxE, n // k_heads, axis=2)
  logits_BxNxTxS = jnp.einsum('btne,bsne->bnts', q_BxTxNxE.astype(jnp.float32),
                              k_BxSxNxE.astype(jnp.float32)) / np.sqrt(e)
  if mask_Bx1xTxS is not None:
    logits_BxNxTxS = jnp.where(mask_Bx1xTxS, logits_BxNxTxS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BxNxTxS, axis=-1)


ACTIVATIONS: dict[str, Callable] = {'gelu': nn.gelu, 'gelu_exact': functools.partial(nn.gelu, approximate=False),
                                    'relu': nn.relu}


class MLP(nn.Module):
  """Position-wise feed-forward block: GELU (tanh approximation: GPT-2, ViT; 'gelu_exact', with
  erf: BERT), ReLU (the original) or SwiGLU."""
  d_ff: int
  activation: Activation = 'gelu'
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, *, train: bool):
    d = x_BxTxD.shape[-1]
    wi = lambda name: dense(self.d_ff, ('mlp',), use_bias=self.use_bias, dtype=self.dtype, name=name,
                            kernel_axes=('embed', 'mlp'))
    if self.activation == 'swiglu':
      h_BxTxF = nn.silu(checkpoint_name(wi('wi_gate')(x_BxTxD), 'mlp_hidden')) * checkpoint_name(
          wi('wi')(x_BxTxD), 'mlp_hidden')
    else:
      act = ACTIVATIONS[self.activation]
      h_BxTxF = act(checkpoint_name(wi('wi')(x_BxTxD), 'mlp_hidden'))
    h_BxTxF = constrain(h_BxTxF, 'activation_batch', 'activation_length', 'activation_mlp')
    h_BxTxF = nn.Dropout(self.dropout_rate, deterministic=not train)(h_BxTxF)
    return dense(d, ('embed',), use_bias=self.use_bias, dtype=self.dtype, name='wo',
                 kernel_axes=('mlp', 'embed'))(h_BxTxF)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """What every block of a Transformer stack shares: its shape and its options."""
  num_heads: int
  head_dim: int
  d_ff: int
  num_kv_heads: int = 0              # 0: one per query head; fewer: grouped-query attention
  pre_ln: bool = True                # x + F(LN(x)); False: LN(x + F(x)), the original
  activation: Activation = 'gelu'    # of the MLP
  rotary: bool = False               # rotary positions in self-attention
  dropout_rate: float = 0.0          # on each sublayer's output and the MLP's hidden activations
  attention_bias: bool = False       # biases on q, k, v and the output projection
  mlp_bias: bool = True
  ln_epsilon: float = 1e-5
  lora_rank: int = 0                 # > 0: LoRA adapters on the attention projections
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32         # compute dtype; parameters stay float32
  attention_impl: str | None = None  # None (JAX picks) | 'xla' | 'cudnn'


class TransformerBlock(nn.Module):
  """Self-attention, optional cross-attention (encoder-decoder), then the MLP; pre- or post-LN. `mask` and
  `cross_mask` (Masks) say which keys each query reads in self- and cross-attention."""
  config: BlockConfig
  cross_attention: bool = False
  decode: bool = False

  scanned: bool = False   # inside nn.scan: returns (x, None), a scan step's carry and output

  @nn.compact
  def __call__(self, x_BxTxD, train: bool, mask: Mask | None = None, positions_BxT=None, segment_ids_BxT=None,
               encoded_BxSxD=None, cross_mask: Mask | None = None):
    # Positional, so that nn.remat can keep `train` static (static_argnums) and nn.scan can broadcast the rest.
    c = self.config
    x_BxTxD = constrain(x_BxTxD, *BxTxD)
    drop = lambda y: nn.Dropout(c.dropout_rate, deterministic=not train)(y)
    attn = lambda name: MultiHeadAttention(
        c.num_heads, c.head_dim, c.num_kv_heads or None, rotary=c.rotary and name == 'self_attention',
        dtype=c.dtype, implementation=c.attention_impl, decode=self.decode, use_bias=c.attention_bias,
        lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, name=name)

    def sublayer(x, name, f):
      norm = layer_norm(c.dtype, f'{name}_norm', c.ln_epsilon)
      return x + drop(f(norm(x))) if c.pre_ln else norm(x + drop(f(x)))

    x = sublayer(x_BxTxD, 'self_attention', lambda y: attn('self_attention')(
        y, mask=mask, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT))
    if self.cross_attention:
      x = sublayer(x, 'cross_attention', lambda y: attn('cross_attention')(y, encoded_BxSxD, mask=cross_mask))
    x = constrain(sublayer(x, 'mlp', lambda y: MLP(c.d_ff, c.activation, c.dropout_rate, c.mlp_bias, c.dtype,
                                                   name='mlp')(y, train=train)), *BxTxD)
    return (x, None) if self.scanned else x


def _dots_saveable(prim, *avals, **params):
  """jax.checkpoint_policies.dots_with_no_batch_dims_saveable, which also sees the dot inside `matmul`'s
  custom_vjp call (the dense layers' on the CPU) as a dot."""
  eqns = params['call_jaxpr'].jaxpr.eqns if prim.name == 'custom_vjp_call' else ()
  if len(eqns) == 1 and eqns[0].primitive is jax.lax.dot_general_p:
    prim, params = eqns[0].primitive, eqns[0].params
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


# What each remat policy keeps from the forward pass for the backward pass (the rest is recomputed). The names are
# the checkpoint_name tags above: q, k, v after their projections, the attention's output (and the log-sum-exp
# its backward pass reads) before the output projection, the MLP's hidden layer before its activation.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': _dots_saveable,   # every projection; not attention's logits
    'qkv': jax.checkpoint_policies.save_only_these_names('query', 'key', 'value'),
    'attention': jax.checkpoint_policies.save_only_these_names('query', 'key', 'value', 'attention'),
    'attention_mlp': jax.checkpoint_policies.save_only_these_names('query', 'key', 'value', 'attention',
                                                                   'mlp_hidden'),
}


def blocks(config: BlockConfig, num_layers: int, x_BxTxD, train: bool, mask: Mask | None = None,
           positions_BxT=None, segment_ids_BxT=None, encoded_BxSxD=None, cross_mask: Mask | None = None, *,
           scan: bool = False, remat_policy: str = 'none', cross_attention: bool = False, decode: bool = False):
  """`num_layers` TransformerBlocks on x, called inside a module's compact method (their parameters are its own).

  Unrolled: modules block_0, block_1, ... . With `scan`, one module `blocks` run by nn.scan, its parameters
  stacked on a leading 'layers' axis (model_zoo.models.protocol converts between the layouts): the program holds
  one block whatever the depth, so compile time stays flat. `remat_policy` (REMAT_POLICIES; 'none' keeps
  everything) recomputes in the backward pass what the forward pass did not keep."""
  block = TransformerBlock
  if remat_policy != 'none':
    block = nn.remat(block, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan, static_argnums=(2,))
  inputs = (mask, positions_BxT, segment_ids_BxT, encoded_BxSxD, cross_mask)
  if not scan:
    for i in range(num_layers):
      x_BxTxD = block(config, cross_attention, decode, name=f'block_{i}')(x_BxTxD, train, *inputs)
    return x_BxTxD
  scanned = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0, 'cache': 1},
                    split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,) * 6, length=num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  return scanned(config, cross_attention, decode, scanned=True, name='blocks')(x_BxTxD, train, *inputs)[0]


class Embed(nn.Module):
  """Token embedding; `attend` reuses the table as the output projection (tied embeddings)."""
  vocab_size: int
  d_model: int
  dtype: Dtype = jnp.float32
  stddev: float = 0.02

  def setup(self):
    self.embedding = self.param(
        'embedding', logical(nn.initializers.normal(self.stddev), ('vocab', 'embed')),
        (self.vocab_size, self.d_model), jnp.float32)

  def __call__(self, tokens_BxT):
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens_BxT, axis=0)

  def attend(self, x_BxTxD):
    return jnp.einsum('btd,vd->btv', x_BxTxD, jnp.asarray(self.embedding, self.dtype))
