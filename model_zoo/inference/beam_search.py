"""Greedy and beam search over any decoder with a key/value cache, each in one jitted loop.

Both take `step_fn(tokens_Nx1, cache, i) -> (logits_NxV, cache)`: the logits of the token after
`tokens` (at position i) for N rows. Beam search keeps K hypotheses per example in rows
b * K + k, so the caller repeats per-example inputs (the encoder output) K times.

Beam search (Wu et al., 2016, GNMT, section 7): a finished hypothesis y scores
log p(y | x) / lp(y) with the length penalty lp(y) = ((5 + |y|) / 6) ** alpha (|y| counts EOS);
alpha = 0 ranks by log-probability alone. Each step extends the K alive hypotheses by every
token and ranks the extensions; those among the best K that end in EOS join the finished set
(which keeps its K best), and the K best that do not end in EOS stay alive (as in fairseq).
An example is done once it has K finished hypotheses (early stop at end-of-sentence, as fairseq
and Hugging Face's early_stopping=True); with K = 1 this is exactly greedy search.
"""
import jax
import jax.numpy as jnp

NEG_INF = -1.0e9


def greedy_search(step_fn, cache, batch_size: int, *, max_len: int, bos_id: int, eos_id: int, pad_id: int = 0):
  """-> tokens [B, max_len]: argmax at every step; after a row's EOS, `pad_id`."""

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_len) & ~jnp.all(done_B)

  def body(carry):
    i, cache, last_B, done_B, out_BxL = carry
    logits_BxV, cache = step_fn(last_B[:, None], cache, i)
    token_B = jnp.where(done_B, pad_id, jnp.argmax(logits_BxV, -1).astype(jnp.int32))
    return i + 1, cache, token_B, done_B | (token_B == eos_id), out_BxL.at[:, i].set(token_B)

  carry = (jnp.int32(0), cache, jnp.full((batch_size,), bos_id, jnp.int32), jnp.zeros((batch_size,), bool),
           jnp.full((batch_size, max_len), pad_id, jnp.int32))
  return jax.lax.while_loop(cond, body, carry)[4]


def length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def _gather(x_BxKx, beams_BxM):
  """x[b, beams[b, m]] for every b, m."""
  return jnp.take_along_axis(x_BxKx, beams_BxM.reshape(beams_BxM.shape + (1,) * (x_BxKx.ndim - 2)), axis=1)


def _gather_cache(cache, beams_BxK):
  """Each cache row b * K + k becomes row b * K + beams[b, k]; scalars (the cache index) stay."""
  b, k = beams_BxK.shape

  def gather(x):
    if x.ndim == 0:
      return x
    return _gather(x.reshape(b, k, *x.shape[1:]), beams_BxK).reshape(x.shape)
  return jax.tree.map(gather, cache)


def beam_search(step_fn, cache, batch_size: int, *, beam_size: int, max_len: int, alpha: float, bos_id: int,
                eos_id: int, pad_id: int = 0):
  """-> (tokens [B, max_len], score [B]): the best hypothesis of each example, EOS included,
  padded with `pad_id`. An example with no finished hypothesis by `max_len` returns its best
  alive one. `cache` holds B * beam_size rows."""
  b, k = batch_size, beam_size

  def cond(carry):
    i, _, _, _, finished_score_BxK, _ = carry
    has_k_finished_B = finished_score_BxK[:, -1] > NEG_INF / 2
    return (i < max_len) & ~jnp.all(has_k_finished_B)

  def body(carry):
    i, cache, alive_logp_BxK, alive_seq_BxKxL, finished_score_BxK, finished_seq_BxKxL = carry
    last_BxK = jnp.where(i == 0, bos_id, alive_seq_BxKxL[:, :, jnp.maximum(i - 1, 0)])
    logits_NxV, cache = step_fn(last_BxK.reshape(b * k, 1), cache, i)
    v = logits_NxV.shape[-1]
    logp_BxKxV = alive_logp_BxK[:, :, None] + jax.nn.log_softmax(logits_NxV).reshape(b, k, v)
    top_logp_Bx2K, top_idx_Bx2K = jax.lax.top_k(logp_BxKxV.reshape(b, k * v), 2 * k)
    beam_Bx2K, token_Bx2K = top_idx_Bx2K // v, (top_idx_Bx2K % v).astype(jnp.int32)
    seq_Bx2KxL = _gather(alive_seq_BxKxL, beam_Bx2K).at[:, :, i].set(token_Bx2K)
    is_eos_Bx2K = token_Bx2K == eos_id
    is_real_Bx2K = top_logp_Bx2K > NEG_INF / 2   # not an extension of a beam that was never live

    # The K best extensions that do not end here stay alive.
    alive_logp_BxK, pick_BxK = jax.lax.top_k(jnp.where(is_eos_Bx2K, NEG_INF, top_logp_Bx2K), k)
    alive_seq_BxKxL = _gather(seq_Bx2KxL, pick_BxK)
    cache = _gather_cache(cache, _gather(beam_Bx2K, pick_BxK))

    # Those among the best K that end here join the finished set, which keeps its K best.
    in_top_k_Bx2K = jnp.arange(2 * k)[None, :] < k
    new_score_Bx2K = jnp.where(is_eos_Bx2K & is_real_Bx2K & in_top_k_Bx2K,
                               top_logp_Bx2K / length_penalty(i + 1, alpha), NEG_INF)
    finished_score_BxK, pick_BxK = jax.lax.top_k(jnp.concatenate([finished_score_BxK, new_score_Bx2K], 1), k)
    finished_seq_BxKxL = _gather(jnp.concatenate([finished_seq_BxKxL, seq_Bx2KxL], 1), pick_BxK)
    return i + 1, cache, alive_logp_BxK, alive_seq_BxKxL, finished_score_BxK, finished_seq_BxKxL

  # Only beam 0 is live at first, so the first step does not pick K copies of one token.
  alive_logp_BxK = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1))
  empty_BxKxL = jnp.full((b, k, max_len), pad_id, jnp.int32)
  carry = (jnp.int32(0), cache, alive_logp_BxK, empty_BxKxL, jnp.full((b, k), NEG_INF), empty_BxKxL)
  _, _, alive_logp_BxK, alive_seq_BxKxL, finished_score_BxK, finished_seq_BxKxL = jax.lax.while_loop(
      cond, body, carry)
  any_finished_B = finished_score_BxK[:, 0] > NEG_INF / 2
  tokens_BxL = jnp.where(any_finished_B[:, None], finished_seq_BxKxL[:, 0], alive_seq_BxKxL[:, 0])
  score_B = jnp.where(any_finished_B, finished_score_BxK[:, 0],
                      alive_logp_BxK[:, 0] / length_penalty(max_len, alpha))
  return tokens_BxL, score_B
