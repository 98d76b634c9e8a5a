"""BERT: a bidirectional Transformer encoder (Devlin et al., 2019), with its task heads.

  h_0 = LN(W_tok[tokens] + W_pos[positions] + W_type[type_ids])      (embedding LayerNorm)
  h_l = block_l(h_{l-1})        post-LN blocks: LN(x + Attn(x)), then LN(x + FFN(x)), GELU (erf)
  masked LM:       p(token at t) = softmax(LN(gelu(h_L[t] W_t + b_t)) W_tok^T + b)   (tied output)
  classification:  p(class) = softmax(tanh(h_L[CLS] W_p + b_p) W_c + b_c)            (pooler, then head)
  token labels:    p(label at t) = softmax(h_L[t] W_c + b_c)

`head` picks one. Parameters of a head live under a module whose name ends in `_head`
(mlm_head, cls_head, token_head; see model_zoo.models.protocol): everything else is the backbone
that fine-tuning restores (`config.init_from`) and can freeze (`config.freeze`). The pooler is part of `cls_head`: masked-LM
pretraining never trains it, so it is initialised (or, from Hugging Face weights, imported) with
the new head. `segment_ids` marks real tokens (1) and padding (0); `type_ids` is BERT's sentence
A/B embedding. Dropout is on the embeddings, each sublayer's output, the FFN's hidden activations
(the shared MLP's, which the paper does not have) and the pooled vector; not on attention
probabilities, which the shared attention kernel does not drop.
"""
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from model_zoo.models import layers


class MLMHead(nn.Module):
  """The masked-LM transform (dense, GELU, LayerNorm) and the output layer tied to the embedding."""
  ln_epsilon: float
  activation: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, embedding_VxD):
    transform = layers.dense(x_BxTxD.shape[-1], ('embed',), use_bias=True, dtype=self.dtype, name='transform',
                             kernel_axes=(None, 'embed'))
    x_BxTxD = layers.ACTIVATIONS[self.activation](transform(x_BxTxD))
    x_BxTxD = layers.layer_norm(self.dtype, 'transform_norm', self.ln_epsilon)(x_BxTxD)
    bias_V = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vocab',)),
                        (embedding_VxD.shape[0],), jnp.float32)
    logits_BxTxV = jnp.einsum('btd,vd->btv', x_BxTxD, embedding_VxD.astype(self.dtype))
    return layers.constrain(logits_BxTxV + bias_V.astype(self.dtype)[None, None], 'activation_batch',
                            'activation_length', 'activation_vocab')


class ClassifierHead(nn.Module):
  """BERT's pooler (tanh dense on the [CLS] vector), dropout, and a dense layer to the classes.
  `pooling='mean'` pools the average of the real tokens instead of [CLS]."""
  num_classes: int
  pooling: str
  dropout_rate: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, *, train: bool):
    """-> class logits [B, L]."""
    if self.pooling == 'cls':
      pooled_BxD = x_BxTxD[:, 0]
    else:
      real_BxTx1 = (segment_ids_BxT != 0)[..., None].astype(x_BxTxD.dtype)
      pooled_BxD = (x_BxTxD * real_BxTx1).sum(1) / jnp.maximum(real_BxTx1.sum(1), 1)
    d = x_BxTxD.shape[-1]
    pooled_BxD = jnp.tanh(layers.dense(d, ('embed',), use_bias=True, dtype=self.dtype, name='pooler',
                                       kernel_axes=(None, 'embed'))(pooled_BxD))
    pooled_BxD = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled_BxD)
    return layers.dense(self.num_classes, (None,), use_bias=True, dtype=self.dtype, name='out',
                        kernel_axes=('embed', None))(pooled_BxD)


class BERT(nn.Module):
  vocab_size: int
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 2
  d_ff: int = 512
  max_len: int = 512
  type_vocab_size: int = 2
  activation: layers.Activation = 'gelu_exact'  # BERT's erf GELU
  ln_epsilon: float = 1e-12
  dropout_rate: float = 0.1
  head: Literal['mlm', 'classify', 'tokens'] = 'mlm'
  num_classes: int = 0               # classify / tokens: set from the data set
  pooling: Literal['cls', 'mean'] = 'cls'  # classify: BERT's pooler on [CLS], or the mean of real tokens
  lora_rank: int = 0                 # > 0: LoRA adapters of this rank on every attention projection
  lora_alpha: float = 16.0
  dtype: layers.ComputeDtype = 'float32'
  attention_impl: layers.AttentionImpl = ''
  scan_layers: bool = False          # one nn.scan over the blocks (parameters stacked on a 'layers' axis)
  remat_policy: layers.RematPolicy = 'none'   # what the backward pass recomputes (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, tokens_BxT, *, train: bool, type_ids_BxT=None, segment_ids_BxT=None, mlm_positions_BxM=None,
               token_embeddings_BxTxD=None):
    """Logits of the head: [B, T, V] (mlm), [B, L] (classify) or [B, T, L] (tokens), in float32.
    With `mlm_positions_BxM`, the masked-LM head runs on those M positions only: [B, M, V].
    `token_embeddings_BxTxD`, if given, stands for the table's rows of tokens_BxT (what attributions move along:
    model_zoo.interpret); the positions and types are added to it as to them."""
    if self.head != 'mlm' and self.num_classes < 2:
      raise ValueError(f'head {self.head!r} needs num_classes >= 2, got {self.num_classes}')
    dtype = jnp.dtype(self.dtype)
    t = tokens_BxT.shape[1]
    type_ids_BxT = jnp.zeros_like(tokens_BxT) if type_ids_BxT is None else type_ids_BxT
    embed = layers.Embed(self.vocab_size, self.d_model, dtype, name='embed')
    table = lambda name, n: self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, 'embed')), (n, self.d_model))
    tok_BxTxD = embed(tokens_BxT) if token_embeddings_BxTxD is None else token_embeddings_BxTxD.astype(dtype)
    x_BxTxD = (tok_BxTxD + table('pos_embedding', self.max_len)[None, :t].astype(dtype)
               + jnp.take(table('type_embedding', self.type_vocab_size), type_ids_BxT, axis=0).astype(dtype))
    x_BxTxD = layers.layer_norm(dtype, 'embed_norm', self.ln_epsilon)(x_BxTxD)
    x_BxTxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)
    # Segment ids mark right padding (1 on real tokens, then 0): every query reads the real tokens.
    mask = None if segment_ids_BxT is None else layers.Mask(kv_lengths_B=jnp.sum(segment_ids_BxT != 0, axis=1))
    block = layers.BlockConfig(
        num_heads=self.num_heads, head_dim=self.d_model // self.num_heads, d_ff=self.d_ff, pre_ln=False,
        activation=self.activation, dropout_rate=self.dropout_rate, attention_bias=True, ln_epsilon=self.ln_epsilon,
        lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=dtype, attention_impl=self.attention_impl or None)
    x_BxTxD = layers.blocks(block, self.num_layers, x_BxTxD, train, mask, scan=self.scan_layers,
                            remat_policy=self.remat_policy)
    if self.head == 'mlm':
      if mlm_positions_BxM is not None:  # BERT's own trick: the V-wide output layer only where it is scored
        x_BxTxD = jnp.take_along_axis(x_BxTxD, mlm_positions_BxM[..., None], axis=1)
      logits = MLMHead(self.ln_epsilon, self.activation, dtype, name='mlm_head')(x_BxTxD, embed.embedding)
    elif self.head == 'classify':
      segment_ids_BxT = jnp.ones_like(tokens_BxT) if segment_ids_BxT is None else segment_ids_BxT
      logits = ClassifierHead(self.num_classes, self.pooling, self.dropout_rate, dtype, name='cls_head')(
          x_BxTxD, segment_ids_BxT, train=train)
    else:
      x_BxTxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)
      logits = layers.dense(self.num_classes, (None,), use_bias=True, dtype=dtype, name='token_head',
                            kernel_axes=('embed', None))(x_BxTxD)
    return logits.astype(jnp.float32)

