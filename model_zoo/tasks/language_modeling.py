"""Language modelling: next-token cross-entropy on packed rows, padding and document boundaries
masked out by `weights`. Eval: loss (nats per token), perplexity, bits per byte."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model_zoo import models
from model_zoo.inference import sampling
from model_zoo.errors import UserError
from model_zoo.tasks.base import SupervisedTask
from model_zoo.training import perf


def model_flops_per_token(params, config) -> float:
  """6 N + 12 L d T (Kaplan et al. 2020; PaLM appendix B): N counts matmul parameters, i.e. all
  but the embedding lookups, plus the output projection V x d when it is tied to the embedding.
  A recurrent model (no attention, no tied embedding) uses each parameter once per token: 6 N."""
  m = config.model
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  n = sum(np.prod(x.shape) for path, x in flat
          if not any(getattr(k, 'key', None) in ('embed', 'pos_embedding') for k in path))
  if m.name == 'rnn_lm':
    return 6 * n
  if m.tie_embeddings:
    n += m.d_model * config.dataset.vocab_size
  return 6 * n + 12 * m.num_layers * m.d_model * config.dataset.seq_len


class LanguageModelingTask(SupervisedTask):
  """Batches hold `inputs`, `targets`, `positions`, `segment_ids` and `weights`, each [B, L]."""

  def build_model(self):
    if self.data.tokenizer.vocab_size != self.config.dataset.vocab_size:
      raise UserError(f'config.dataset.vocab_size={self.config.dataset.vocab_size} but the tokenizer has '
                      f'{self.data.tokenizer.vocab_size} tokens; set them equal')
    return models.build(self.config.model, vocab_size=self.config.dataset.vocab_size)

  def model_inputs(self, batch):
    return (batch['inputs'],)

  def _logits(self, params, model_state, batch, *, train, rng=None):
    variables = {'params': params, **model_state}
    return self.model.apply(variables, batch['inputs'], train=train, positions_BxT=batch['positions'],
                            segment_ids_BxT=batch['segment_ids'], rngs={'dropout': rng} if train else {})

  def loss_fn(self, params, model_state, batch, rng):
    logits_BxLxV = self._logits(params, model_state, batch, train=True, rng=rng)
    w_BxL = batch['weights']
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
    denom = jnp.maximum(w_BxL.sum(), 1.0)
    loss = jnp.sum(loss_BxL * w_BxL) / denom
    accuracy = jnp.sum((jnp.argmax(logits_BxLxV, -1) == batch['targets']) * w_BxL) / denom
    return loss, ({'loss': loss, 'accuracy': accuracy}, model_state)

  def eval_step(self, state, batch):
    logits_BxLxV = self._logits(state.params, state.model_state, batch, train=False)
    w_BxL = batch['weights'] * batch['mask'][:, None]
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
    token_bytes_V = jnp.asarray(self.data.tokenizer.token_bytes())
    return {'loss_sum': jnp.sum(loss_BxL * w_BxL), 'tokens': jnp.sum(w_BxL),
            'bytes': jnp.sum(token_bytes_V[batch['targets']] * w_BxL),
            'correct': jnp.sum((jnp.argmax(logits_BxLxV, -1) == batch['targets']) * w_BxL)}

  def eval_metrics(self, stats):
    loss = float(stats['loss_sum'] / stats['tokens'])
    nats_per_byte = float(stats['loss_sum'] / stats['bytes'])
    return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)), 'accuracy': float(stats['correct'] / stats['tokens']),
            'nats_per_byte': nats_per_byte, 'bits_per_byte': nats_per_byte / math.log(2)}

  def throughput(self, state, steps_per_sec: float) -> dict[str, float]:
    tokens = self.config.batch_size * self.config.dataset.seq_len
    flops = model_flops_per_token(state.params, self.config) * tokens * steps_per_sec
    peak = perf.peak_flops(self.config.model.get('dtype', 'float32'))
    return {'tokens_per_sec': tokens * steps_per_sec, 'tflops_per_sec': flops / 1e12, 'mfu': flops / peak}

  def generate_text(self, params, prompts: list[str], rng, *, max_new_tokens: int, temperature: float,
                    top_k: int, top_p: float) -> list[str]:
    """Continuations of `prompts` (each starts a new document), stopping at end-of-document."""
    if self.config.model.name != 'gpt':
      raise UserError(f'--mode=sample decodes with a key/value cache, which only the gpt model has; '
                      f'config.model.name is {self.config.model.name!r}')
    tok = self.data.tokenizer
    encoded = [[tok.bos_id] + tok.encode(p) for p in prompts]
    width = max(map(len, encoded))
    if width + max_new_tokens > self.config.model.max_len and self.config.model.positional == 'learned':
      raise UserError(f'prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                      f'max_len {self.config.model.max_len}; ask for fewer tokens')
    prompt_BxP = np.full((len(prompts), width), tok.pad_id, np.int32)
    for row, ids in enumerate(encoded):
      prompt_BxP[row, width - len(ids):] = ids  # left-padded: every row ends where decoding starts
    new_BxN = sampling.generate(self.model, params, jnp.asarray(prompt_BxP), rng, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eos_id,
                                pad_id=tok.pad_id)
    return [tok.decode([t for t in row if t != tok.pad_id]) for row in np.asarray(new_BxN).tolist()]
