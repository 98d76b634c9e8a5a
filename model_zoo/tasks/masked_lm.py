"""Masked language modelling (BERT pretraining): cross-entropy on the masked positions only.

Batches come from data.text_classification with `mlm_probability` > 0: `inputs` (masked),
`targets` (the original tokens), `segment_ids`, `type_ids`, and the M chosen positions
`mlm_positions` with `mlm_weights` (0 on padding entries): the output layer runs on those only.
Metrics: loss (nats per masked token), accuracy on the masked tokens, perplexity.
"""
import jax.numpy as jnp

from model_zoo.errors import UserError
from model_zoo.tasks import losses
from model_zoo.tasks.base import SupervisedTask
from model_zoo.tasks.classification import TextModel


class MaskedLMTask(TextModel, SupervisedTask):
  head = 'mlm'
  interpretations = ('attention',)
  logged_only = ('accuracy',)   # over the vocabulary: on logged steps only

  @classmethod
  def check_config(cls, config):
    if not 0 < config.dataset.get('mlm_probability', 0) < 1:
      raise UserError(f'task masked_lm needs config.dataset.mlm_probability in (0, 1) (0.15 in BERT), got '
                      f'{config.dataset.get("mlm_probability")}')

  def model_kwargs(self, batch):
    return {**super().model_kwargs(batch), 'mlm_positions_BxM': batch['mlm_positions']}

  def serving_batch(self, inputs):
    """At inference the output layer runs on every position."""
    b, t = inputs['inputs'].shape
    return {**inputs, 'mlm_positions': jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}

  def serving_outputs(self, logits_BxTxV):
    return {'logits': logits_BxTxV}

  def _sums(self, logits_BxMxV, batch, w_BxM):
    targets_BxM = jnp.take_along_axis(batch['targets'], batch['mlm_positions'], axis=1)
    return losses.token_sums(logits_BxMxV, targets_BxM, w_BxM)

  def loss_from_outputs(self, logits_BxMxV, batch):
    metrics = losses.means(self._sums(logits_BxMxV, batch, batch['mlm_weights']))
    return metrics['loss'], metrics

  def output_weights(self, batch):
    return batch['mlm_weights']

  def loss_weight(self, batch):
    return jnp.sum(batch['mlm_weights'])

  def eval_step(self, state, batch):
    sums = self._sums(self.predict(state, batch), batch, batch['mlm_weights'] * batch['mask'][:, None])
    return {k: sums[k] for k in ('loss_sum', 'correct', 'count')}

  def eval_metrics(self, stats):
    loss = float(stats['loss_sum'] / stats['count'])
    return {'loss': loss, 'accuracy': float(stats['correct'] / stats['count']), 'perplexity': losses.perplexity(loss)}
