"""Recurrent networks: LSTM and GRU cells scanned over time, for language modelling and for
sequence classification.

LSTM (Hochreiter & Schmidhuber, 1997, "Long short-term memory"), with the forget gate of
Gers, Schmidhuber & Cummins (2000, "Learning to forget"):
  i_t = sigmoid(W_i x_t + U_i h_{t-1} + b_i)            input gate
  f_t = sigmoid(W_f x_t + U_f h_{t-1} + b_f)            forget gate (b_f starts at 1)
  g_t = tanh(W_g x_t + U_g h_{t-1} + b_g)               candidate cell
  o_t = sigmoid(W_o x_t + U_o h_{t-1} + b_o)            output gate
  c_t = f_t * c_{t-1} + i_t * g_t;   h_t = o_t * tanh(c_t)
GRU (Cho et al., 2014, "Learning phrase representations using RNN encoder-decoder", eqs. 5-8):
  r_t = sigmoid(W_r x_t + U_r h_{t-1} + b_r)            reset gate
  z_t = sigmoid(W_z x_t + U_z h_{t-1} + b_z)            update gate
  n_t = tanh(W_n x_t + U_n (r_t * h_{t-1}) + b_n)       candidate state
  h_t = z_t * h_{t-1} + (1 - z_t) * n_t
(r_t multiplies h_{t-1} before U_n, as in the paper; cuDNN and flax's GRUCell apply it after.)

W x_t + b of every gate and step is one matmul before the scan; only U h_{t-1} is inside it.
Layers (`rnn/block_<i>`) are stacked with dropout on the non-recurrent connections only (Zaremba
et al., 2014): on the input embedding, between layers and before the output layer. The state starts
at zero and is set back to zero where `reset_BxT` is true, a document start in a packed row
(positions == 0), so no document reads another. With `decode=True` (the protocol's decoder mode)
the last state of each call is kept in the 'cache' collection and the next call starts from it,
so a sequence can be fed a prompt, then a token at a time. Shape letters: T time steps, D input
size, F state size, G gates x F, V vocab, L classes.
"""
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.config import lookup
from model_zoo.models import layers


def lstm_step(u_FxG, carry, xw_BxG):
  """(c_{t-1}, h_{t-1}) and W x_t + b (gates i, f, g, o) -> (c_t, h_t)."""
  c_BxF, h_BxF = carry
  i, f, g, o = jnp.split(xw_BxG + h_BxF @ u_FxG, 4, axis=-1)
  c_BxF = nn.sigmoid(f) * c_BxF + nn.sigmoid(i) * jnp.tanh(g)
  return c_BxF, nn.sigmoid(o) * jnp.tanh(c_BxF)


def gru_step(u_FxG, carry, xw_BxG):
  """(h_{t-1},) and W x_t + b (gates r, z, n) -> (h_t,)."""
  (h_BxF,) = carry
  hidden = h_BxF.shape[-1]
  xr, xz, xn = jnp.split(xw_BxG, 3, axis=-1)
  ur, uz = jnp.split(h_BxF @ u_FxG[:, :2 * hidden], 2, axis=-1)
  r_BxF, z_BxF = nn.sigmoid(xr + ur), nn.sigmoid(xz + uz)
  n_BxF = jnp.tanh(xn + (r_BxF * h_BxF) @ u_FxG[:, 2 * hidden:])
  return (z_BxF * h_BxF + (1 - z_BxF) * n_BxF,)


# cell name -> (step, number of gates, number of state vectors)
CELLS = {'lstm': (lstm_step, 4, 2), 'gru': (gru_step, 3, 1)}


def _orthogonal_blocks(gates: int):
  """U = [U_1 ... U_gates], each F x F block orthogonal (Saxe et al., 2014)."""
  def init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, gates)
    return jnp.concatenate([nn.initializers.orthogonal()(k, (shape[0], shape[0]), dtype) for k in keys], 1)
  return init


def _gate_bias(cell: str, hidden: int):
  """Zeros, except the LSTM forget-gate bias b_f = 1 (Gers et al., 2000; Jozefowicz et al., 2015)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    b_G = jnp.zeros(shape, dtype)
    return b_G.at[hidden:2 * hidden].set(1.0) if cell == 'lstm' else b_G
  return init


class Recurrent(nn.Module):
  """One recurrent layer over a sequence: x_BxTxD -> h_BxTxF (the hidden state after each step)."""
  cell: str
  hidden_size: int
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, reset_BxT):
    step, gates, num_states = lookup(CELLS, self.cell, 'recurrent cell', 'model.cell')
    hidden = self.hidden_size
    xw_BxTxG = layers.linear(gates * hidden, 'w', bias_init=_gate_bias(self.cell, hidden))(x_BxTxD)
    u_FxG = self.param('u', nn.with_logical_partitioning(_orthogonal_blocks(gates), ('embed', 'mlp')),
                       (hidden, gates * hidden))

    def scan_step(carry, inputs):
      xw_BxG, reset_B = inputs
      carry = tuple(jnp.where(reset_B[:, None], 0.0, s_BxF) for s_BxF in carry)
      carry = step(u_FxG, carry, xw_BxG)
      return carry, carry[-1]

    zeros = tuple(jnp.zeros((x_BxTxD.shape[0], hidden), xw_BxTxG.dtype) for _ in range(num_states))
    state = self.variable('cache', 'state', lambda: zeros) if self.decode else None
    start = zeros if state is None or self.is_initializing() else state.value
    last, h_TxBxF = jax.lax.scan(scan_step, start, (xw_BxTxG.swapaxes(0, 1), reset_BxT.swapaxes(0, 1)))
    if state is not None and not self.is_initializing():
      state.value = last
    return h_TxBxF.swapaxes(0, 1)


class RNN(nn.Module):
  """`num_layers` recurrent layers, dropout between them and on the output."""
  cell: str
  hidden_size: int
  num_layers: int
  dropout_rate: float
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, *, train: bool, reset_BxT=None):
    if reset_BxT is None:
      reset_BxT = jnp.zeros(x_BxTxD.shape[:2], bool)
    for i in range(self.num_layers):
      if i:
        x_BxTxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)
      x_BxTxD = Recurrent(self.cell, self.hidden_size, self.decode, name=f'block_{i}')(x_BxTxD, reset_BxT)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)


class RNNLM(nn.Module):
  """Language model: p(x_{t+1} | x_<=t) = softmax(W_o h_t + b_o) (lm_head), h_t from an embedding of x_t."""
  vocab_size: int
  cell: Literal['lstm', 'gru'] = 'lstm'
  num_layers: int = 2
  embed_size: int = 128
  hidden_size: int = 256
  dropout_rate: float = 0.0
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, *, train: bool, positions_BxT=None, segment_ids_BxT=None):
    del segment_ids_BxT  # a new segment starts at position 0: positions alone mark the resets
    # Unit-variance embeddings (flax's default is 1/sqrt(embed_size)): with inputs that small the
    # gates barely see the token at first, and the LSTM learned about half as fast on pydoc.
    x_BxTxD = nn.Embed(self.vocab_size, self.embed_size, name='embed', embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('vocab', 'embed')))(tokens_BxT)
    x_BxTxD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BxTxD)
    reset_BxT = None if positions_BxT is None else positions_BxT == 0
    h_BxTxF = RNN(self.cell, self.hidden_size, self.num_layers, self.dropout_rate, self.decode, name='rnn')(
        x_BxTxD, train=train, reset_BxT=reset_BxT)
    return layers.linear(self.vocab_size, 'lm_head', axes=('embed', 'vocab'))(h_BxTxF)


class RNNClassifier(nn.Module):
  """Reads an image row by row (T = image height steps of width * channels pixels) and
  classifies it from the last hidden state: logits = W_o h_T + b_o (cls_head)."""
  num_classes: int
  cell: Literal['lstm', 'gru'] = 'lstm'
  num_layers: int = 1
  hidden_size: int = 128
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, image_BxTxWxC, *, train: bool):
    x_BxTxD = image_BxTxWxC.reshape(*image_BxTxWxC.shape[:2], -1)
    h_BxTxF = RNN(self.cell, self.hidden_size, self.num_layers, self.dropout_rate, name='rnn')(
        x_BxTxD, train=train)
    return layers.linear(self.num_classes, 'cls_head', axes=('embed', None))(h_BxTxF[:, -1])
