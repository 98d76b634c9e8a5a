"""GPT: a decoder-only Transformer language model (Radford et al., 2018/2019).

  h_0 = W_e[tokens] (+ W_p[positions]);  h_l = block_l(h_{l-1}) with causal self-attention;
  p(x_{t+1} | x_<=t) = softmax(LN(h_L) W_e^T)       (tied output embedding; untied is an option)

Blocks are the shared pre-LN `TransformerBlock` (GPT-2's layout). Packed rows are handled with
segment ids (attention stays inside a document) and per-document positions. A decoder in the sense
of model_zoo.models.protocol: `decode=True` keeps a key/value cache.
"""
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from model_zoo.models import layers


class GPT(nn.Module):
  vocab_size: int
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 0             # 0: as many as query heads; fewer: grouped-query attention
  d_ff: int = 512
  max_len: int = 256
  positional: Literal['learned', 'sinusoidal', 'rotary'] = 'learned'
  activation: layers.Activation = 'gelu'  # gelu: the tanh approximation; gelu_exact: erf
  pre_ln: bool = True
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  dtype: layers.ComputeDtype = 'float32'
  scan_layers: bool = False          # one nn.scan over the blocks (parameters stacked on a 'layers' axis)
  remat_policy: layers.RematPolicy = 'none'   # what the backward pass recomputes (layers.REMAT_POLICIES)
  attention_impl: layers.AttentionImpl = ''
  attention_bias: bool = False       # biases on q, k, v and the output projection (GPT-2 has them)
  ln_epsilon: float = 1e-5
  lora_rank: int = 0                 # > 0: LoRA adapters of this rank on every attention projection
  lora_alpha: float = 16.0
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, *, train: bool, positions_BxT=None, segment_ids_BxT=None,
               token_embeddings_BxTxD=None, features: bool = False):
    """-> logits [B, T, V] of each next token. `token_embeddings_BxTxD`, if given, stands for the table's rows of
    tokens_BxT (what attributions move along: model_zoo.interpret). `features=True`: the output layer's input
    [B, T, D] instead, which `logits` turns into the same logits (a loss over chunks of the sequence)."""
    dtype = jnp.dtype(self.dtype)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    embed = layers.Embed(self.vocab_size, self.d_model, dtype, name='embed')
    x_BxTxD = embed(tokens_BxT) if token_embeddings_BxTxD is None else token_embeddings_BxTxD.astype(dtype)
    if self.positional == 'learned':
      pos = self.param('pos_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, 'embed')), (self.max_len, self.d_model))
      x_BxTxD = x_BxTxD + jnp.take(pos, positions_BxT, axis=0).astype(dtype)
    elif self.positional == 'sinusoidal':
      x_BxTxD = x_BxTxD + layers.sinusoidal_positions(positions_BxT, self.d_model).astype(dtype)
    x_BxTxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)

    # Packed rows: causal within each document; a row of one document (no segment ids): causal alone.
    mask = layers.Mask(causal=True, q_segments_BxT=segment_ids_BxT)
    block = layers.BlockConfig(
        num_heads=self.num_heads, head_dim=self.d_model // self.num_heads, d_ff=self.d_ff,
        num_kv_heads=self.num_kv_heads, pre_ln=self.pre_ln, activation=self.activation,
        rotary=self.positional == 'rotary', dropout_rate=self.dropout_rate, attention_bias=self.attention_bias,
        ln_epsilon=self.ln_epsilon, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=dtype,
        attention_impl=self.attention_impl or None)
    x_BxTxD = layers.blocks(block, self.num_layers, x_BxTxD, train, mask, positions_BxT, segment_ids_BxT,
                            scan=self.scan_layers, remat_policy=self.remat_policy, decode=self.decode)
    if self.pre_ln:
      x_BxTxD = layers.layer_norm(dtype, 'final_norm', self.ln_epsilon)(x_BxTxD)
    if features:
      return x_BxTxD
    if self.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = layers.dense(self.vocab_size, ('vocab',), use_bias=False, dtype=dtype, name='lm_head',
                                  kernel_axes=('embed', 'vocab'))(x_BxTxD)
    return layers.constrain(logits_BxTxV, 'activation_batch', 'activation_length', 'activation_vocab').astype(
        jnp.float32)

  def output_weight(self, params):
    """The output layer's weight [V, D] (the embedding table, or lm_head's kernel transposed) in the compute dtype,
    laid out as an activation: gathered over FSDP once, where a loop over chunks of the sequence would otherwise
    gather it (and reduce its gradient) once a chunk."""
    params = nn.meta.unbox(params)
    w_VxD = params['embed']['embedding'] if self.tie_embeddings else params['lm_head']['kernel'].T
    return layers.constrain(w_VxD.astype(jnp.dtype(self.dtype)), 'activation_vocab', 'activation_embed')

  def logits(self, w_VxD, x_BxTxD):
    """`__call__`'s logits from its `features=True` output and `output_weight` (no bound module needed, so a loss
    can call it once a chunk: model_zoo.tasks.losses.chunked_token_sums)."""
    logits_BxTxV = jnp.einsum('btd,vd->btv', x_BxTxD, w_VxD)
    return layers.constrain(logits_BxTxV, 'activation_batch', 'activation_length', 'activation_vocab').astype(
        jnp.float32)
