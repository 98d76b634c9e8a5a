"""Masked language modelling (BERT pretraining): cross-entropy on the masked positions only.

Batches come from data.text_classification with `mlm_probability` > 0: `inputs` (masked),
`targets` (the original tokens), `segment_ids`, `type_ids`, and the chosen positions
`mlm_positions` with `mlm_weights` (0 on padding entries): the output layer runs on those only.
Metrics: loss (nats per masked token), accuracy on the masked tokens, perplexity.
"""
import math

import jax.numpy as jnp
import optax

from model_zoo.errors import UserError
from model_zoo.tasks.base import SupervisedTask
from model_zoo.tasks.classification import TextModel


class MaskedLMTask(TextModel, SupervisedTask):
  head = 'mlm'

  def build_model(self):
    if not self.config.dataset.get('mlm_probability', 0) > 0:
      raise UserError('task masked_lm needs config.dataset.mlm_probability > 0 (0.15 in BERT)')
    return super().build_model()

  def model_kwargs(self, batch):
    return {**super().model_kwargs(batch), 'mlm_positions_BxP': batch['mlm_positions']}

  def _sums(self, logits_BxPxV, batch, w_BxP):
    targets_BxP = jnp.take_along_axis(batch['targets'], batch['mlm_positions'], axis=1)
    loss_BxP = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV, targets_BxP)
    correct_BxP = jnp.argmax(logits_BxPxV, -1) == targets_BxP
    return {'loss_sum': jnp.sum(loss_BxP * w_BxP), 'correct': jnp.sum(correct_BxP * w_BxP), 'count': jnp.sum(w_BxP)}

  def loss_fn(self, params, model_state, batch, rng):
    logits, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                     **self.model_kwargs(batch))
    sums = self._sums(logits, batch, batch['mlm_weights'])
    count = jnp.maximum(sums['count'], 1.0)
    loss = sums['loss_sum'] / count
    return loss, ({'loss': loss, 'accuracy': sums['correct'] / count}, model_state)

  def eval_step(self, state, batch):
    logits, _ = self.apply(state.params, state.model_state, self.model_inputs(batch), train=False,
                           **self.model_kwargs(batch))
    return self._sums(logits, batch, batch['mlm_weights'] * batch['mask'][:, None])

  def eval_metrics(self, stats):
    loss = float(stats['loss_sum'] / stats['count'])
    return {'loss': loss, 'accuracy': float(stats['correct'] / stats['count']),
            'perplexity': math.exp(min(loss, 700.0))}
