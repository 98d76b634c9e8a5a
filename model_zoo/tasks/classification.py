"""Classification: softmax cross-entropy; accuracy, macro precision/recall/F1, confusion matrix.

`classification` takes images (or any array input); `text_classification` takes token rows with a
padding mask (`segment_ids`) and sentence types (`type_ids`), for BERT; `token_classification`
labels every token (`labels` and `weights` [B, L]), and its metrics count tokens.
"""
import os

import jax
import jax.numpy as jnp
import optax

from model_zoo import models
from model_zoo.errors import UserError
from model_zoo.evaluation import metrics as metrics_lib
from model_zoo.evaluation import plots
from model_zoo.tasks.base import SupervisedTask


class ClassificationTask(SupervisedTask):
  """Batches hold `image` (or any input) and integer `label`."""

  def build_model(self):
    return models.build(self.config.model, num_classes=self.data.num_classes)

  def model_inputs(self, batch):
    return (batch['image'],)

  def loss_fn(self, params, model_state, batch, rng):
    logits, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                     **self.model_kwargs(batch))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, ({'loss': loss, 'accuracy': accuracy}, model_state)

  def eval_step(self, state, batch):
    logits, _ = self.apply(state.params, state.model_state, self.model_inputs(batch), train=False,
                           **self.model_kwargs(batch))
    mask = batch['mask']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    num_classes = self.data.num_classes
    true_BxC = jax.nn.one_hot(batch['label'], num_classes) * mask[:, None]
    pred_BxC = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    return {'loss_sum': jnp.sum(loss * mask), 'count': jnp.sum(mask),
            'confusion': jnp.einsum('bt,bp->tp', true_BxC, pred_BxC)}

  def eval_metrics(self, stats):
    return {'loss': float(stats['loss_sum'] / stats['count']),
            **metrics_lib.classification_metrics(stats['confusion'])}

  def eval_artifacts(self, stats, outdir):
    plots.confusion_matrix(stats['confusion'], self.data.class_names,
                           os.path.join(outdir, 'confusion_matrix.png'))


class TextModel:
  """What every BERT task shares: its model inputs, and building the model with the task's head."""
  head = ''

  def build_model(self):
    """The model with this task's head, after checking the config against the data and the model."""
    config, data = self.config, self.data
    max_len = config.model.get('max_len', config.dataset.seq_len)
    if config.dataset.seq_len > max_len:
      raise UserError(f'config.dataset.seq_len={config.dataset.seq_len} is longer than the model\'s position '
                      f'table (config.model.max_len={max_len}); shorten it')
    for key, ok, want in (('pooling', lambda v: v in ('cls', 'mean'), "'cls' or 'mean'"),
                          ('lora_rank', lambda v: v >= 0, 'an integer >= 0')):
      if key in config.model and not ok(config.model[key]):
        raise UserError(f'config.model.{key} must be {want}, got {config.model[key]!r}')
    # config.dataset.vocab_size may exceed the tokenizer's: a checkpoint's table can be padded.
    if data.tokenizer.vocab_size > config.dataset.vocab_size:
      raise UserError(f'the tokenizer has {data.tokenizer.vocab_size} tokens but config.dataset.vocab_size='
                      f'{config.dataset.vocab_size}; set them equal')
    classes = {'num_classes': data.num_classes} if self.head != 'mlm' else {}
    return models.build(config.model, head=self.head, vocab_size=config.dataset.vocab_size, **classes)

  def model_inputs(self, batch):
    return (batch['inputs'],)

  def model_kwargs(self, batch):
    return {'type_ids_BxT': batch['type_ids'], 'segment_ids_BxT': batch['segment_ids']}


class TextClassificationTask(TextModel, ClassificationTask):
  """Batches hold `inputs`, `segment_ids`, `type_ids` [B, L] and `label` [B] (data.text_classification)."""
  head = 'classify'


class TokenClassificationTask(TextClassificationTask):
  """A label per token: batches also hold `labels` and `weights` [B, L] (0 where a token has none)."""
  head = 'tokens'

  def loss_fn(self, params, model_state, batch, rng):
    logits_BxLxC, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                           **self.model_kwargs(batch))
    w_BxL = batch['weights']
    count = jnp.maximum(w_BxL.sum(), 1.0)
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BxLxC, batch['labels']) * w_BxL) / count
    accuracy = jnp.sum((jnp.argmax(logits_BxLxC, -1) == batch['labels']) * w_BxL) / count
    return loss, ({'loss': loss, 'accuracy': accuracy}, model_state)

  def eval_step(self, state, batch):
    logits_BxLxC, _ = self.apply(state.params, state.model_state, self.model_inputs(batch), train=False,
                                 **self.model_kwargs(batch))
    w_BxL = batch['weights'] * batch['mask'][:, None]
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxC, batch['labels'])
    true_BxLxC = jax.nn.one_hot(batch['labels'], self.data.num_classes) * w_BxL[..., None]
    pred_BxLxC = jax.nn.one_hot(jnp.argmax(logits_BxLxC, -1), self.data.num_classes)
    return {'loss_sum': jnp.sum(loss_BxL * w_BxL), 'count': jnp.sum(w_BxL),
            'confusion': jnp.einsum('blt,blp->tp', true_BxLxC, pred_BxLxC)}
