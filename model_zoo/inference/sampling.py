"""Autoregressive generation with a cache, in one jitted loop, for any decoder language model
(model_zoo.models.protocol: GPT's key/value cache, the LSTM's recurrent state).

The prompt fills the cache in one call (`prefill`); then each step feeds back one token (`decode_step`):
the two functions a StableHLO export of a language model holds. Prompts
of different lengths are left-padded (segment id 0 marks padding, positions count real tokens),
so all rows decode in lockstep. Which tokens are padding is given by the prompts' lengths, not by
their ids: a tokenizer may pad with its BOS id (GPT-2's <|endoftext|> is both). Sampling: greedy (temperature 0), temperature, top-k, top-p
(nucleus: the smallest set of tokens whose probability adds up to at least p).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model_zoo.models import protocol


def sample_logits(logits_BxV, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """One token per row. temperature 0 -> argmax; top_k 0 and top_p 1 -> no truncation."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  neg = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, -1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, -1), -1)
    # Keep a token if the mass before it is < p: the top token always stays.
    keep_BxV = (cum_BxV - jax.nn.softmax(sorted_BxV, -1)) < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), -1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, neg, logits_BxV)
  return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


def right_to_left(tokens_BxT, lengths_B, pad_id: int = 0):
  """Right-padded rows of `lengths_B` tokens, left-padded with `pad_id`: a gather, not a roll (no modulo of a
  symbolic length, which ONNX export cannot take)."""
  b, t = tokens_BxT.shape
  source_BxT = jax.lax.broadcasted_iota(jnp.int32, (b, t), 1) - (t - jnp.asarray(lengths_B, jnp.int32)[:, None])
  gathered_BxT = jnp.take_along_axis(tokens_BxT, jnp.maximum(source_BxT, 0), axis=1)
  return jnp.where(source_BxT >= 0, gathered_BxT, pad_id).astype(tokens_BxT.dtype)


def prefill(model: nn.Module, params, prompt_BxT, lengths_B, cache_size: int, cache_like=None):
  """Fills a fresh cache of `cache_size` slots a row with left-padded prompts of `lengths_B` tokens (the
  cache shaped as `cache_like`, a batch-1 cache's shapes, if given).
  -> (the logits of each row's next token [B, V], the cache, each row's next position [B])."""
  b, t = prompt_BxT.shape
  valid_BxT = jax.lax.broadcasted_iota(jnp.int32, (b, t), 1) >= t - jnp.asarray(lengths_B)[:, None]
  positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=-1) - 1, 0)
  cache = (protocol.init_cache(model, jnp.zeros((b, cache_size), jnp.int32)) if cache_like is None
           else protocol.empty_cache(cache_like, b))
  apply = functools.partial(model.clone(decode=True).apply, {'params': params, 'cache': cache}, prompt_BxT,
                            train=False, positions_BxT=positions_BxT, segment_ids_BxT=valid_BxT.astype(jnp.int32),
                            mutable=['cache'])
  if callable(getattr(model, 'output_weight', None)):   # GPT: the output layer on the last position alone
    features_BxTxD, variables = apply(features=True)
    logits_BxV = model.logits(model.output_weight(params), features_BxTxD[:, -1:])[:, 0]
  else:
    logits_BxTxV, variables = apply()
    logits_BxV = logits_BxTxV[:, -1]
  return logits_BxV, variables['cache'], positions_BxT[:, -1] + 1


def decode_step(model: nn.Module, params, cache, token_B, position_B):
  """Appends one token a row at `position_B`. -> (the logits of the next token [B, V], the cache)."""
  logits_Bx1xV, variables = model.clone(decode=True).apply(
      {'params': params, 'cache': cache}, token_B[:, None], train=False, positions_BxT=position_B[:, None],
      mutable=['cache'])
  return logits_Bx1xV[:, 0], variables['cache']


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p',
                                             'eos_id', 'pad_id'))
def generate(model: nn.Module, params, prompt_BxT, rng, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0, lengths_B=None):
  """-> new tokens [B, max_new_tokens]; after a row's `eos_id` the rest of it is `pad_id`.
  `lengths_B`: each left-padded prompt's length (default: its tokens that are not `pad_id`)."""
  b, t = prompt_BxT.shape
  if lengths_B is None:
    lengths_B = jnp.sum(prompt_BxT != pad_id, -1)
  logits_BxV, cache, next_pos_B = prefill(model, params, prompt_BxT, lengths_B, t + max_new_tokens)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, logits_BxV, out_BxU, done_B, next_pos_B = carry
    # A key per row and step: a row's draws are the same whatever the batch holds besides it (padding rows,
    # another process count), so a multi-host run samples what one host does.
    keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, i), r))(jnp.arange(b))
    drawn_B = jax.vmap(lambda logits_V, key: sample(logits_V[None], key)[0])(logits_BxV, keys_B)
    token_B = jnp.where(done_B, pad_id, drawn_B)
    out_BxU = out_BxU.at[:, i].set(token_B)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    logits_BxV, cache = decode_step(model, params, cache, token_B, next_pos_B)
    return i + 1, cache, logits_BxV, out_BxU, done_B, next_pos_B + 1

  carry = (jnp.int32(0), cache, logits_BxV, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((b,), bool), next_pos_B)
  return jax.lax.while_loop(cond, body, carry)[3]
