"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need".

  encoder:  z = Enc(sqrt(d) E[src] + PE),  N layers of self-attention (padding mask) and FFN
  decoder:  h = Dec(sqrt(d) E[tgt_in] + PE, z),  N layers of causal self-attention,
            cross-attention over z, and FFN
  p(y_t | y_<t, x) = softmax(h_t E^T)            (section 3.4: one matrix E for source and target
                                                  embeddings and the output projection, if shared)
Blocks are the shared `layers.TransformerBlock`, in two stacks `encoder/block_<i>` and
`decoder/block_<i>`: post-LN as in the paper (pre-LN as an option, with a final LayerNorm on each
stack), ReLU FFN, dropout on every sublayer output, on the FFN's hidden activations and on the
embedded inputs. Rows may pack several pairs: segment ids keep attention inside a pair. A decoder in
the sense of model_zoo.models.protocol (`decode=True` caches the decoder's keys and values);
`encode` and `decode_logits` are the two halves that beam search calls.
"""
import functools

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.models import layers


class Stack(nn.Module):
  """`num_layers` blocks named block_0, block_1, ..., and a final LayerNorm after pre-LN blocks."""
  config: layers.BlockConfig
  num_layers: int
  cross_attention: bool = False
  decode: bool = False
  scan: bool = False
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x_BxTxD, train: bool, **inputs):
    x_BxTxD = layers.blocks(self.config, self.num_layers, x_BxTxD, train, **inputs, scan=self.scan,
                            remat_policy=self.remat_policy, cross_attention=self.cross_attention, decode=self.decode)
    if self.config.pre_ln:
      x_BxTxD = layers.layer_norm(self.config.dtype, 'final_norm')(x_BxTxD)
    return x_BxTxD


class Transformer(nn.Module):
  vocab_size: int
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  d_ff: int = 512
  max_len: int = 256                 # longest sequence, for learned positions
  positional: Literal['sinusoidal', 'learned'] = 'sinusoidal'
  activation: layers.Activation = 'relu'
  pre_ln: bool = False
  share_embeddings: bool = True      # source, target and output share one matrix
  dropout_rate: float = 0.1
  dtype: layers.ComputeDtype = 'float32'
  attention_impl: layers.AttentionImpl = ''
  scan_layers: bool = False          # one nn.scan over each stack's blocks (parameters stacked on a 'layers' axis)
  remat_policy: layers.RematPolicy = 'none'   # what the backward pass recomputes (layers.REMAT_POLICIES)
  decode: bool = False               # decoder self-attention keeps a key/value cache

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    embed = functools.partial(layers.Embed, self.vocab_size, self.d_model, dtype, stddev=self.d_model ** -0.5)
    self.embed = embed()
    self.target_embed = self.embed if self.share_embeddings else embed()
    if self.positional == 'learned':
      init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, 'embed'))
      self.src_pos_embedding = self.param('src_pos_embedding', init, (self.max_len, self.d_model))
      self.tgt_pos_embedding = self.param('tgt_pos_embedding', init, (self.max_len, self.d_model))
    block = layers.BlockConfig(
        num_heads=self.num_heads, head_dim=self.d_model // self.num_heads, d_ff=self.d_ff, pre_ln=self.pre_ln,
        activation=self.activation, dropout_rate=self.dropout_rate, dtype=dtype,
        attention_impl=self.attention_impl or None)
    stack = functools.partial(Stack, block, scan=self.scan_layers, remat_policy=self.remat_policy)
    self.encoder = stack(self.num_encoder_layers)
    self.decoder = stack(self.num_decoder_layers, cross_attention=True, decode=self.decode)
    if not self.share_embeddings:
      self.lm_head = layers.dense(self.vocab_size, ('vocab',), use_bias=False, dtype=dtype, name=None,
                                  kernel_axes=('embed', 'vocab'))
    self.dropout = nn.Dropout(self.dropout_rate)

  def _embed(self, embed, table, tokens_BxT, positions_BxT, train):
    x_BxTxD = embed(tokens_BxT) * jnp.asarray(self.d_model ** 0.5, embed.dtype)
    if self.positional == 'learned':
      x_BxTxD = x_BxTxD + jnp.take(table, positions_BxT, axis=0).astype(x_BxTxD.dtype)
    else:
      x_BxTxD = x_BxTxD + layers.sinusoidal_positions(positions_BxT, self.d_model).astype(x_BxTxD.dtype)
    return self.dropout(x_BxTxD, deterministic=not train)

  def encode(self, src_BxS, *, train: bool, src_segments_BxS=None, src_positions_BxS=None):
    """-> z [B, S, D]. Without segment ids, pad tokens (id 0) are masked out."""
    segments_BxS = (src_BxS != 0).astype(jnp.int32) if src_segments_BxS is None else src_segments_BxS
    positions_BxS = _positions(src_BxS) if src_positions_BxS is None else src_positions_BxS
    x_BxSxD = self._embed(self.embed, getattr(self, 'src_pos_embedding', None), src_BxS, positions_BxS, train)
    return self.encoder(x_BxSxD, train, mask=layers.Mask(q_segments_BxT=segments_BxS))

  def decode_logits(self, z_BxSxD, src_segments_BxS, tgt_in_BxT, *, train: bool, tgt_segments_BxT=None,
                    tgt_positions_BxT=None):
    """-> logits [B, T, V] of each next target token. In decode mode, T new tokens at positions
    `tgt_positions_BxT` are appended to the cache (one pair per row: no segments)."""
    positions_BxT = _positions(tgt_in_BxT) if tgt_positions_BxT is None else tgt_positions_BxT
    y_BxTxD = self._embed(self.target_embed, getattr(self, 'tgt_pos_embedding', None), tgt_in_BxT,
                          positions_BxT, train)
    # One pair per row (no target segments): causal, and the source's padding left out.
    self_mask = layers.Mask(causal=True, q_segments_BxT=tgt_segments_BxT)
    cross_mask = layers.Mask(q_segments_BxT=tgt_segments_BxT, kv_segments_BxS=src_segments_BxS)
    y_BxTxD = self.decoder(y_BxTxD, train, mask=self_mask, positions_BxT=positions_BxT,
                           encoded_BxSxD=z_BxSxD, cross_mask=cross_mask)
    logits_BxTxV = self.target_embed.attend(y_BxTxD) if self.share_embeddings else self.lm_head(y_BxTxD)
    return layers.constrain(logits_BxTxV, 'activation_batch', 'activation_length', 'activation_vocab').astype(
        jnp.float32)

  def __call__(self, src_BxS, tgt_in_BxT, *, train: bool, src_segments_BxS=None, src_positions_BxS=None,
               tgt_segments_BxT=None, tgt_positions_BxT=None):
    """Teacher forcing: -> logits [B, T, V] of tgt_out given tgt_in ([BOS] + target)."""
    if src_segments_BxS is None:
      src_segments_BxS = (src_BxS != 0).astype(jnp.int32)
    z_BxSxD = self.encode(src_BxS, train=train, src_segments_BxS=src_segments_BxS,
                          src_positions_BxS=src_positions_BxS)
    return self.decode_logits(z_BxSxD, src_segments_BxS, tgt_in_BxT, train=train,
                              tgt_segments_BxT=tgt_segments_BxT, tgt_positions_BxT=tgt_positions_BxT)


def _positions(tokens_BxT):
  return jax.lax.broadcasted_iota(jnp.int32, tokens_BxT.shape, 1)
