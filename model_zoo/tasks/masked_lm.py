"""Masked language modelling (BERT pretraining): cross-entropy on the masked positions only.

Batches come from data.text_classification with `mlm_probability` > 0: `inputs` (masked),
`targets` (the original tokens), `weights` (1 on the masked positions), `segment_ids`, `type_ids`.
Metrics: loss (nats per masked token), accuracy on the masked tokens, perplexity.
"""
import math

import jax.numpy as jnp
import optax

from model_zoo import models
from model_zoo.tasks.base import SupervisedTask
from model_zoo.tasks.classification import text_vocab_size


class MaskedLMTask(SupervisedTask):

  def build_model(self):
    return models.build(self.config.model, head='mlm', vocab_size=text_vocab_size(self.config, self.data))

  def model_inputs(self, batch):
    return (batch['inputs'],)

  def model_kwargs(self, batch):
    return {'type_ids_BxT': batch['type_ids'], 'segment_ids_BxT': batch['segment_ids']}

  def _sums(self, logits_BxLxV, batch, w_BxL):
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch['targets'])
    correct_BxL = jnp.argmax(logits_BxLxV, -1) == batch['targets']
    return {'loss_sum': jnp.sum(loss_BxL * w_BxL), 'correct': jnp.sum(correct_BxL * w_BxL), 'count': jnp.sum(w_BxL)}

  def loss_fn(self, params, model_state, batch, rng):
    logits, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                     **self.model_kwargs(batch))
    sums = self._sums(logits, batch, batch['weights'])
    count = jnp.maximum(sums['count'], 1.0)
    loss = sums['loss_sum'] / count
    return loss, ({'loss': loss, 'accuracy': sums['correct'] / count}, model_state)

  def eval_step(self, state, batch):
    logits, _ = self.apply(state.params, state.model_state, self.model_inputs(batch), train=False,
                           **self.model_kwargs(batch))
    return self._sums(logits, batch, batch['weights'] * batch['mask'][:, None])

  def eval_metrics(self, stats):
    loss = float(stats['loss_sum'] / stats['count'])
    return {'loss': loss, 'accuracy': float(stats['correct'] / stats['count']),
            'perplexity': math.exp(min(loss, 700.0))}
