"""Greedy and beam search over any decoder with a key/value cache, each in one jitted loop.

Both take `step_fn(tokens_Rx1, cache, i) -> (logits_RxV, cache)`: the logits of the token after
`tokens` (at position i) for R rows. Beam search keeps J hypotheses per example in rows
b * J + j (R = B * J), so the caller repeats per-example inputs (the encoder output) J times.
U = max_len, the tokens decoded.

Beam search (Wu et al., 2016, GNMT, section 7): a finished hypothesis y scores
log p(y | x) / lp(y) with the length penalty lp(y) = ((5 + |y|) / 6) ** alpha (|y| counts EOS);
alpha = 0 ranks by log-probability alone. Each step extends the J alive hypotheses by every
token and ranks the extensions; those among the best J that end in EOS join the finished set
(which keeps its J best), and the J best that do not end in EOS stay alive (as in fairseq).
An example is done once it has J finished hypotheses and no alive one can still beat the worst of
them: log-probabilities only fall, so an alive hypothesis scores at best its log p / lp(max_len).
From then on its finished set is frozen while the other examples of the batch go on, so a batch
decodes each example exactly as it would alone.
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
    i, cache, last_B, done_B, out_BxU = carry
    logits_BxV, cache = step_fn(last_B[:, None], cache, i)
    token_B = jnp.where(done_B, pad_id, jnp.argmax(logits_BxV, -1).astype(jnp.int32))
    return i + 1, cache, token_B, done_B | (token_B == eos_id), out_BxU.at[:, i].set(token_B)

  carry = (jnp.int32(0), cache, jnp.full((batch_size,), bos_id, jnp.int32), jnp.zeros((batch_size,), bool),
           jnp.full((batch_size, max_len), pad_id, jnp.int32))
  return jax.lax.while_loop(cond, body, carry)[4]


def length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def _gather(x, beams):
  """x[b, beams[b, m]] for every b, m: x is [B, J, ...], beams [B, M] holds indices into J."""
  return jnp.take_along_axis(x, beams.reshape(beams.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_cache(cache, beams_BxJ):
  """Each cache row b * J + j becomes row b * J + beams[b, j]; scalars stay."""
  b, j = beams_BxJ.shape

  def gather(x):
    if x.ndim == 0:
      return x
    return _gather(x.reshape(b, j, *x.shape[1:]), beams_BxJ).reshape(x.shape)
  return jax.tree.map(gather, cache)


def beam_search(step_fn, cache, batch_size: int, *, beam_size: int, max_len: int, alpha: float, bos_id: int,
                eos_id: int, pad_id: int = 0):
  """-> (tokens [B, max_len], score [B]): the best hypothesis of each example, EOS included,
  padded with `pad_id`. An example with no finished hypothesis by `max_len` returns its best
  alive one. `cache` holds B * beam_size rows."""
  b, j = batch_size, beam_size

  def done(alive_logp_BxJ, finished_score_BxJ):
    has_j_finished_B = finished_score_BxJ[:, -1] > NEG_INF / 2
    best_possible_B = alive_logp_BxJ[:, 0] / length_penalty(max_len, alpha)
    return has_j_finished_B & (best_possible_B <= finished_score_BxJ[:, -1])

  def cond(carry):
    i, _, alive_logp_BxJ, _, finished_score_BxJ, _ = carry
    return (i < max_len) & ~jnp.all(done(alive_logp_BxJ, finished_score_BxJ))

  def body(carry):
    i, cache, alive_logp_BxJ, alive_seq_BxJxU, finished_score_BxJ, finished_seq_BxJxU = carry
    done_Bx1 = done(alive_logp_BxJ, finished_score_BxJ)[:, None]
    last_BxJ = jnp.where(i == 0, bos_id, alive_seq_BxJxU[:, :, jnp.maximum(i - 1, 0)])
    logits_RxV, cache = step_fn(last_BxJ.reshape(b * j, 1), cache, i)
    v = logits_RxV.shape[-1]
    logp_BxJxV = alive_logp_BxJ[:, :, None] + jax.nn.log_softmax(logits_RxV).reshape(b, j, v)
    top_logp_Bx2J, top_idx_Bx2J = jax.lax.top_k(logp_BxJxV.reshape(b, j * v), 2 * j)
    beam_Bx2J, token_Bx2J = top_idx_Bx2J // v, (top_idx_Bx2J % v).astype(jnp.int32)
    seq_Bx2JxU = _gather(alive_seq_BxJxU, beam_Bx2J).at[:, :, i].set(token_Bx2J)
    is_eos_Bx2J = token_Bx2J == eos_id
    is_real_Bx2J = top_logp_Bx2J > NEG_INF / 2   # not an extension of a beam that was never live

    # The J best extensions that do not end here stay alive.
    alive_logp_BxJ, pick_BxJ = jax.lax.top_k(jnp.where(is_eos_Bx2J, NEG_INF, top_logp_Bx2J), j)
    alive_seq_BxJxU = _gather(seq_Bx2JxU, pick_BxJ)
    cache = _gather_cache(cache, _gather(beam_Bx2J, pick_BxJ))

    # Those among the best J that end here join the finished set, which keeps its J best; the set of an
    # example that was already done stays as it was.
    in_top_j_Bx2J = jnp.arange(2 * j)[None, :] < j
    new_score_Bx2J = jnp.where(is_eos_Bx2J & is_real_Bx2J & in_top_j_Bx2J & ~done_Bx1,
                               top_logp_Bx2J / length_penalty(i + 1, alpha), NEG_INF)
    finished_score_BxJ, pick_BxJ = jax.lax.top_k(jnp.concatenate([finished_score_BxJ, new_score_Bx2J], 1), j)
    finished_seq_BxJxU = _gather(jnp.concatenate([finished_seq_BxJxU, seq_Bx2JxU], 1), pick_BxJ)
    return i + 1, cache, alive_logp_BxJ, alive_seq_BxJxU, finished_score_BxJ, finished_seq_BxJxU

  # Only beam 0 is live at first, so the first step does not pick J copies of one token.
  alive_logp_BxJ = jnp.tile(jnp.array([0.0] + [NEG_INF] * (j - 1)), (b, 1))
  empty_BxJxU = jnp.full((b, j, max_len), pad_id, jnp.int32)
  carry = (jnp.int32(0), cache, alive_logp_BxJ, empty_BxJxU, jnp.full((b, j), NEG_INF), empty_BxJxU)
  _, _, alive_logp_BxJ, alive_seq_BxJxU, finished_score_BxJ, finished_seq_BxJxU = jax.lax.while_loop(
      cond, body, carry)
  any_finished_B = finished_score_BxJ[:, 0] > NEG_INF / 2
  tokens_BxU = jnp.where(any_finished_B[:, None], finished_seq_BxJxU[:, 0], alive_seq_BxJxU[:, 0])
  score_B = jnp.where(any_finished_B, finished_score_BxJ[:, 0],
                      alive_logp_BxJ[:, 0] / length_penalty(max_len, alpha))
  return tokens_BxU, score_B
