"""Classification: softmax cross-entropy; accuracy, macro precision/recall/F1, confusion matrix.

`classification` takes images (or any array input); `text_classification` takes token rows with a
padding mask (`segment_ids`) and sentence types (`type_ids`), for BERT; `token_classification`
labels every token (`labels` and `weights` [B, T]), and its metrics count tokens.
"""
import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.models import registry
from model_zoo.tasks import losses
from model_zoo.tasks.base import Attribution, model_state_of, SupervisedTask


class ClassificationTask(SupervisedTask):
  """Batches hold `image` (or any input) and integer `label`."""
  serving_inputs = ('image',)

  def serving_outputs(self, logits):
    return {'probabilities': jax.nn.softmax(logits.astype(jnp.float32), -1),
            'label': jnp.argmax(logits, -1).astype(jnp.int32)}

  def build_model(self):
    return registry.build(self.config.model, num_classes=self.info.num_classes)

  def model_inputs(self, batch):
    return (batch['image'],)

  def labels_and_weights(self, batch):
    """The labels, and the weight of each (1; 0 where there is no label)."""
    return batch['label'], jnp.ones(batch['label'].shape, jnp.float32)

  def loss_from_outputs(self, logits, batch):
    metrics = losses.means(losses.token_sums(logits, *self.labels_and_weights(batch)))
    return metrics['loss'], metrics

  def output_weights(self, batch):
    return self.labels_and_weights(batch)[1]

  def loss_weight(self, batch):
    return jnp.sum(self.labels_and_weights(batch)[1])

  def eval_step(self, state, batch):
    logits = self.predict(state, batch)
    labels, weights = self.labels_and_weights(batch)
    weights = weights * batch['mask'].reshape(batch['mask'].shape + (1,) * (labels.ndim - 1))
    sums = losses.token_sums(logits, labels, weights)
    return {'loss_sum': sums['loss_sum'], 'count': sums['count'],
            'confusion': losses.confusion(logits, labels, weights, self.info.num_classes)}

  def eval_metrics(self, stats):
    return {'loss': float(stats['loss_sum'] / stats['count']), **losses.classification_metrics(stats['confusion'])}

  def eval_artifacts(self, stats, workdir):
    plots.confusion_matrix(stats['confusion'], self.info.class_names, workdir.confusion_matrix)

  attribution_baselines = ('zeros', 'mean')   # the first is the default
  interpretations = ('integrated_gradients', 'smoothgrad', 'gradient_x_input', 'occlusion', 'attention')

  def attribution(self, variables, batch, baseline):
    """Of the pixels, summed over channels; baseline 'zeros' (a black image) or 'mean' (each image's mean colour)."""
    params, model_state = variables['params'], model_state_of(variables)
    x_BxHxWxC = batch['image'].astype(jnp.float32)
    if baseline == 'zeros':
      b_BxHxWxC = jnp.zeros_like(x_BxHxWxC)
    else:
      b_BxHxWxC = jnp.broadcast_to(jnp.mean(x_BxHxWxC, axis=(1, 2), keepdims=True), x_BxHxWxC.shape)
    logits = lambda x: self.apply(params, model_state, (x,), train=False)[0]
    return Attribution(x_BxHxWxC, b_BxHxWxC, logits, jnp.ones(x_BxHxWxC.shape[:3], bool), batch['label'])


class TextModel:
  """What every BERT task shares: its model inputs, and building the model with the task's head."""
  head = ''
  serving_inputs = ('inputs', 'segment_ids', 'type_ids')

  def build_model(self):
    """The model with this task's head, after checking the config against the data and the model."""
    config, info = self.config, self.info
    max_len = config.model.get('max_len', config.dataset.seq_len)
    if config.dataset.seq_len > max_len:
      raise UserError(f'config.dataset.seq_len={config.dataset.seq_len} is longer than the model\'s position '
                      f'table (config.model.max_len={max_len}); shorten it')
    for key, ok, want in (('pooling', lambda v: v in ('cls', 'mean'), "'cls' or 'mean'"),
                          ('lora_rank', lambda v: v >= 0, 'an integer >= 0')):
      if key in config.model and not ok(config.model[key]):
        raise UserError(f'config.model.{key} must be {want}, got {config.model[key]!r}')
    # config.dataset.vocab_size may exceed the tokenizer's: a checkpoint's table can be padded.
    if info.tokenizer.vocab_size > config.dataset.vocab_size:
      raise UserError(f'the tokenizer has {info.tokenizer.vocab_size} tokens but config.dataset.vocab_size='
                      f'{config.dataset.vocab_size}; set them equal')
    classes = {'num_classes': info.num_classes} if self.head != 'mlm' else {}
    return registry.build(config.model, head=self.head, vocab_size=config.dataset.vocab_size, **classes)

  def model_inputs(self, batch):
    return (batch['inputs'],)

  def model_kwargs(self, batch):
    return {'type_ids_BxT': batch['type_ids'], 'segment_ids_BxT': batch['segment_ids']}

  def text_batch(self, texts: list[str]) -> dict:
    """A batch of `texts` as the data set encodes them (no labels: -1)."""
    from model_zoo.data import text_classification  # pylint: disable=g-import-not-at-top
    rows = [text_classification.encode(ids, self.config.dataset.seq_len, self.info.tokenizer)
            for ids in self.info.tokenizer.encode_batch(texts)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return {**batch, 'label': np.full(len(texts), -1, np.int32)}


class TextClassificationTask(TextModel, ClassificationTask):
  """Batches hold `inputs`, `segment_ids`, `type_ids` [B, T] and `label` [B] (data.text_classification)."""
  head = 'classify'
  attribution_baselines = ('mask', 'pad')

  def attribution(self, variables, batch, baseline):
    """Of the token embeddings (BERT's table, params['embed']['embedding']), summed over the embedding; the
    baseline replaces every real token but [CLS] and [SEP] by <mask> ('mask') or by padding ('pad')."""
    params, model_state = variables['params'], model_state_of(variables)
    tok, tokens_BxT = self.info.tokenizer, batch['inputs']
    valid_BxT = (batch['segment_ids'] != 0) & (tokens_BxT != tok.bos_id) & (tokens_BxT != tok.eos_id)
    fill = tok.mask_id if baseline == 'mask' else tok.pad_id
    table_VxD = params['embed']['embedding']
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(jnp.float32)
    b_BxTxD = jnp.take(table_VxD, jnp.where(valid_BxT, fill, tokens_BxT), axis=0).astype(jnp.float32)

    def logits(x_BxTxD):
      return self.apply(params, model_state, (tokens_BxT,), train=False, token_embeddings_BxTxD=x_BxTxD,
                        **self.model_kwargs(batch))[0]
    return Attribution(x_BxTxD, b_BxTxD, logits, valid_BxT, batch['label'])


class TokenClassificationTask(TextClassificationTask):
  """A label per token: batches also hold `labels` and `weights` [B, T] (0 where a token has none)."""
  head = 'tokens'
  interpretations = ('attention',)

  def labels_and_weights(self, batch):
    return batch['labels'], batch['weights']

  def attribution(self, variables, batch, baseline):
    raise UserError('attributions of per-token labels are not written yet: the token_classification task has '
                    'attention maps (--method=attention)')
