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
import dataclasses
import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
logical = nn.with_logical_partitioning

# The choices of the options the families share. A model field typed with one of these (or with any
# Literal) is checked by model_zoo.models.registry before anything is built or read: a misspelt value
# is an error that lists the choices, never a silent default.
Activation = Literal['gelu', 'gelu_exact', 'relu', 'swiglu']
ComputeDtype = Literal['float32', 'bfloat16', 'float16']     # parameters stay float32
AttentionImpl = Literal['', 'xla', 'cudnn']                   # '': JAX picks


# Plain layers for the families without attention: kernels [in, out] named ('embed', 'mlp') and
# convolution kernels [kh, kw, in, out] named (None, None, None, 'embed'), so that FSDP shards
# their input features or output channels (see model_zoo.training.sharding).

def linear(features: int, name: str | None = None, *, use_bias: bool = True, axes: tuple = ('embed', 'mlp'),
           kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros_init(), dtype=None):
  """nn.Dense with logically named kernel [in, out] and bias [out]."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, kernel_init=logical(kernel_init, axes),
                  bias_init=logical(bias_init, axes[-1:]))


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
      bias_init=logical(nn.initializers.zeros_init(), axes))


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-5):
  """LayerNorm computed in float32 whatever the compute dtype, output cast to `dtype`."""
  return nn.LayerNorm(
      dtype=dtype, name=name, epsilon=epsilon,
      scale_init=logical(nn.initializers.ones_init(), ('embed',)),
      bias_init=logical(nn.initializers.zeros_init(), ('embed',)))


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


def segment_mask(q_segment_ids_BxT, kv_segment_ids_BxS=None):
  """Boolean mask [B, 1, T, S], True where a query may attend to a key.

  Segment ids number the documents packed into a row; 0 marks padding. A query attends only
  to keys of its own segment, which covers padding masks (one segment) and packing (several).
  """
  kv_BxS = q_segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
  mask_BxTxS = (q_segment_ids_BxT[:, :, None] == kv_BxS[:, None, :]) & (kv_BxS[:, None, :] != 0)
  return mask_BxTxS[:, None]


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-query) dot-product attention, self or cross, with an optional KV cache.

  The kernel is `jax.nn.dot_product_attention`; `implementation` picks XLA ('xla'), the fused
  cuDNN kernel on GPU ('cudnn') or lets JAX choose (None). In `decode` mode the keys and values
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
  def __call__(self, x_BxTxD, kv_BxSxD=None, *, mask_Bx1xTxS=None, causal: bool = False,
               positions_BxT=None, kv_positions_BxS=None, segment_ids_BxT=None):
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

    q_BxTxNxE = project(x_BxTxD, (n, e), ('heads', 'kv'), 'query')
    k_BxSxKxE = project(kv_BxSxD, (k_heads, e), ('heads', 'kv'), 'key')
    v_BxSxKxE = project(kv_BxSxD, (k_heads, e), ('heads', 'kv'), 'value')
    if self.rotary:
      q_BxTxNxE = apply_rotary(q_BxTxNxE, positions_BxT)
      k_BxSxKxE = apply_rotary(k_BxSxKxE, positions_BxT if self_attention else kv_positions_BxS)

    if self.decode and self_attention:
      k_BxSxKxE, v_BxSxKxE, mask_Bx1xTxS = self._update_cache(
          k_BxSxKxE, v_BxSxKxE, positions_BxT, segment_ids_BxT)
      causal = False  # the cache mask already holds causality
    t, s = q_BxTxNxE.shape[1], k_BxSxKxE.shape[1]
    if causal and mask_Bx1xTxS is None and t == s:
      out_BxTxNxE = jax.nn.dot_product_attention(
          q_BxTxNxE, k_BxSxKxE, v_BxSxKxE, is_causal=True, implementation=self.implementation)
    else:
      out_BxTxNxE = jax.nn.dot_product_attention(
          q_BxTxNxE, k_BxSxKxE, v_BxSxKxE, mask=_with_causal(mask_Bx1xTxS, causal, t, s),
          implementation=self.implementation)
    if self.is_mutable_collection('intermediates'):
      # Asked for (model.apply(..., mutable=['intermediates']): model_zoo.interpret), never in training or
      # init: the probabilities the fused kernel keeps inside, recomputed here.
      self.sow('intermediates', 'attention_probabilities',
               attention_probabilities(q_BxTxNxE, k_BxSxKxE, _with_causal(mask_Bx1xTxS, causal, t, s)))
    return project(out_BxTxNxE, d, ('embed',), 'out', in_axes=(-2, -1), kernel_axes=('heads', 'kv', 'embed'))

  def _update_cache(self, k_BxTxKxE, v_BxTxKxE, positions_BxT, segment_ids_BxT):
    """Writes this call's T keys/values at each row's cache index; returns the whole cache and its mask.

    Each row has its own index (the slots it has filled), so rows of one cache may be at different points of
    their sequences, as the slots of continuous batching are. Attention reads the positions kept with the keys,
    not the slots: a padded slot (segment id 0) holds position 0 and is never attended to."""
    b = k_BxTxKxE.shape[0]
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k_BxTxKxE.shape, k_BxTxKxE.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v_BxTxKxE.shape, v_BxTxKxE.dtype)
    # Positions + 1 of the cached keys; 0 marks an empty slot or padding, so a zero cache is empty.
    cached_pos = self.variable('cache', 'positions_plus_1', jnp.zeros, k_BxTxKxE.shape[:2], jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((b,), jnp.int32))
    if self.is_initializing():  # init only creates the cache, at full length
      return k_BxTxKxE, v_BxTxKxE, None
    t = k_BxTxKxE.shape[1]
    valid_BxT = jnp.ones(positions_BxT.shape, bool) if segment_ids_BxT is None else segment_ids_BxT != 0
    i_B = index.value
    rows_Bx1 = jax.lax.broadcasted_iota(jnp.int32, (b, 1), 0)
    slots_BxT = i_B[:, None] + jax.lax.broadcasted_iota(jnp.int32, (1, t), 1)
    write = lambda cache, new: cache.at[rows_Bx1, slots_BxT].set(new, mode='promise_in_bounds')
    cached_k.value = write(cached_k.value, k_BxTxKxE)
    cached_v.value = write(cached_v.value, v_BxTxKxE)
    cached_pos.value = write(cached_pos.value, jnp.where(valid_BxT, positions_BxT + 1, 0).astype(jnp.int32))
    index.value = i_B + t
    kp_Bx1xS = cached_pos.value[:, None, :]
    mask_BxTxS = (kp_Bx1xS > 0) & (kp_Bx1xS <= positions_BxT[:, :, None] + 1)
    return cached_k.value, cached_v.value, mask_BxTxS[:, None]


def _with_causal(mask_Bx1xTxS, causal: bool, t: int, s: int):
  """The mask, and-ed with the causal triangle when `causal`."""
  if not causal:
    return mask_Bx1xTxS
  tri_1x1xTxS = jnp.tril(jnp.ones((t, s), bool))[None, None]
  return tri_1x1xTxS if mask_Bx1xTxS is None else mask_Bx1xTxS & tri_1x1xTxS


def attention_probabilities(q_BxTxNxE, k_BxSxKxE, mask_Bx1xTxS=None):
  """softmax(q k^T / sqrt(E), masked) [B, N, T, S] in float32, what jax.nn.dot_product_attention computes
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
      h_BxTxF = nn.silu(wi('wi_gate')(x_BxTxD)) * wi('wi')(x_BxTxD)
    else:
      act = ACTIVATIONS[self.activation]
      h_BxTxF = act(wi('wi')(x_BxTxD))
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
  """Self-attention, optional cross-attention (encoder-decoder), then the MLP; pre- or post-LN."""
  config: BlockConfig
  causal: bool = False
  cross_attention: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, train: bool, *, mask_Bx1xTxS=None, positions_BxT=None, segment_ids_BxT=None,
               encoded_BxSxD=None, cross_mask_Bx1xTxS=None):
    # `train` is positional so that nn.remat(TransformerBlock, static_argnums=(2,)) can keep it static.
    c = self.config
    drop = lambda y: nn.Dropout(c.dropout_rate, deterministic=not train)(y)
    attn = lambda name: MultiHeadAttention(
        c.num_heads, c.head_dim, c.num_kv_heads or None, rotary=c.rotary and name == 'self_attention',
        dtype=c.dtype, implementation=c.attention_impl, decode=self.decode, use_bias=c.attention_bias,
        lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, name=name)

    def sublayer(x, name, f):
      norm = layer_norm(c.dtype, f'{name}_norm', c.ln_epsilon)
      return x + drop(f(norm(x))) if c.pre_ln else norm(x + drop(f(x)))

    x = sublayer(x_BxTxD, 'self_attention', lambda y: attn('self_attention')(
        y, mask_Bx1xTxS=mask_Bx1xTxS, causal=self.causal, positions_BxT=positions_BxT,
        segment_ids_BxT=segment_ids_BxT))
    if self.cross_attention:
      x = sublayer(x, 'cross_attention', lambda y: attn('cross_attention')(
          y, encoded_BxSxD, mask_Bx1xTxS=cross_mask_Bx1xTxS))
    return sublayer(x, 'mlp', lambda y: MLP(c.d_ff, c.activation, c.dropout_rate, c.mlp_bias, c.dtype,
                                            name='mlp')(y, train=train))


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
