"""Language modelling: next-token cross-entropy on packed rows, padding and document boundaries
masked out by `weights`. Eval: loss (nats per token), perplexity, bits per byte. Any model with the
protocol's language-model call `(tokens, train, positions_BxT, segment_ids_BxT) -> logits` fits
(GPT, the LSTM/GRU); `--mode=sample` works with those that are decoders (model_zoo.models.protocol).
"""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.errors import UserError
from model_zoo.inference import sampling
from model_zoo.models import protocol, registry
from model_zoo.tasks import losses
from model_zoo.tasks.base import Attribution, model_state_of, Input, Serving, SupervisedTask
from model_zoo.training import perf


def _until(ids: list[int], eos_id: int) -> list[int]:
  """The tokens before the first `eos_id` (generation pads the rest)."""
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


class LanguageModelingTask(SupervisedTask):
  """Batches hold `inputs`, `targets`, `positions`, `segment_ids` and `weights`, each [B, T]."""
  interpretations = ('attention', 'integrated_gradients', 'smoothgrad', 'gradient_x_input', 'occlusion')
  attribution_baselines = ('pad', 'zeros')   # the padding token's embedding, or a zero vector
  logged_only = ('accuracy',)   # over the vocabulary: on logged steps only

  def attribution(self, variables, batch, baseline):
    """The next token after the first document of each row, as a class among the vocabulary, attributed to that
    document's tokens (not [BOS]) through their embeddings (params['embed']['embedding']); labels: the true next
    token where the batch has `targets`."""
    if 'token_embeddings_BxTxD' not in inspect.signature(type(self.model).__call__).parameters:
      raise UserError(f'attributions of a language model go through its token embeddings, which '
                      f'config.model.name={self.config.model.name!r} takes no input for; --method=attention')
    params, model_state = variables['params'], model_state_of(variables)
    tokens_BxT, segments_BxT = batch['inputs'], batch['segment_ids']
    first_BxT = (segments_BxT == segments_BxT[:, :1]) & (segments_BxT != 0)
    last_B = jnp.sum(first_BxT, axis=1) - 1
    valid_BxT = first_BxT & (tokens_BxT != self.info.tokenizer.bos_id)
    table_VxD = params['embed']['embedding']
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(jnp.float32)
    fill_D = table_VxD[self.info.tokenizer.pad_id] if baseline == 'pad' else jnp.zeros(table_VxD.shape[1:])
    b_BxTxD = jnp.where(valid_BxT[..., None], fill_D[None, None].astype(jnp.float32), x_BxTxD)

    def logits(x_BxTxD):
      out_BxTxV = self.apply(params, model_state, (tokens_BxT,), train=False, token_embeddings_BxTxD=x_BxTxD,
                             **self.model_kwargs(batch))[0]
      return jnp.take_along_axis(out_BxTxV, last_B[:, None, None], axis=1)[:, 0]
    rows_B = jnp.arange(tokens_BxT.shape[0])
    labels_B = batch['targets'][rows_B, last_B] if 'targets' in batch else jnp.full(last_B.shape, -1, jnp.int32)
    return Attribution(x_BxTxD, b_BxTxD, logits, valid_BxT, labels_B)

  def __init__(self, config, info):
    super().__init__(config, info)
    self._flops_per_token = None
    self.loss_chunks = config.get('loss_chunks', 0)
    if self.loss_chunks:
      self._check_loss_chunks()

  def _check_loss_chunks(self):
    chunks, seq_len = self.loss_chunks, self.config.dataset.seq_len
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0 or seq_len % max(chunks, 1):
      raise UserError(f'config.loss_chunks={chunks!r} must be 0 (off) or a whole number that divides '
                      f'config.dataset.seq_len={seq_len}')
    if not callable(getattr(self.model, 'output_weight', None)):
      raise UserError(f'config.loss_chunks={chunks} takes the output layer apart from the model, which '
                      f'config.model.name={self.config.model.name!r} has no `output_weight` and `logits` methods '
                      f'for (GPT has); set 0')
    for key, value in (('quantization.mode', self.config.quantization.mode), ('distill.teacher',
                                                                               self.config.distill.teacher)):
      if value not in ('', 'none', 'ptq'):   # ptq: eval.py quantizes (ptq.inference_config sets loss_chunks 0)
        raise UserError(f'config.loss_chunks={chunks} and config.{key}={value!r} do not go together (they need the '
                        f'whole logits); set config.loss_chunks=0')

  def build_model(self):
    if self.info.tokenizer.vocab_size != self.config.dataset.vocab_size:
      raise UserError(f'config.dataset.vocab_size={self.config.dataset.vocab_size} but the tokenizer has '
                      f'{self.info.tokenizer.vocab_size} tokens; set them equal')
    return registry.build(self.config.model, vocab_size=self.config.dataset.vocab_size)

  def model_inputs(self, batch):
    return (batch['inputs'],)

  def model_kwargs(self, batch):
    # Rows without segment ids hold one document each: causal attention needs no mask then.
    return {'positions_BxT': batch['positions'], 'segment_ids_BxT': batch.get('segment_ids')}

  def loss_fn(self, params, model_state, batch, rng, teacher=None):
    if not self.loss_chunks:
      return super().loss_fn(params, model_state, batch, rng, teacher)
    # The cross-entropy a chunk of the sequence at a time (config.loss_chunks): no [B, T, V] logits held.
    features_BxTxD, model_state = self.apply(params, model_state, self.model_inputs(batch), train=True, rng=rng,
                                             features=True, **self.model_kwargs(batch))
    w_VxD = self.model.output_weight(params)   # gathered once, not once a chunk
    sums = losses.chunked_token_sums(features_BxTxD, lambda x: self.model.logits(w_VxD, x), batch['targets'],
                                     batch['weights'], self.loss_chunks)
    metrics = losses.means(sums)
    return metrics['loss'], (metrics, model_state)

  def loss_from_outputs(self, logits_BxTxV, batch):
    metrics = losses.means(losses.token_sums(logits_BxTxV, batch['targets'], batch['weights']))
    return metrics['loss'], metrics

  def output_weights(self, batch):
    return batch['weights']

  def loss_weight(self, batch):
    return jnp.sum(batch['weights'])

  def eval_step(self, state, batch):
    logits_BxTxV = self.predict(state, batch)
    w_BxT = batch['weights'] * batch['mask'][:, None]
    sums = losses.token_sums(logits_BxTxV, batch['targets'], w_BxT)
    token_bytes_V = jnp.asarray(self.info.tokenizer.token_bytes())
    return {'loss_sum': sums['loss_sum'], 'tokens': sums['count'], 'correct': sums['correct'],
            'bytes': jnp.sum(token_bytes_V[batch['targets']] * w_BxT)}

  def eval_metrics(self, stats):
    loss = float(stats['loss_sum'] / stats['tokens'])
    nats_per_byte = float(stats['loss_sum'] / stats['bytes'])
    return {'loss': loss, 'perplexity': losses.perplexity(loss), 'accuracy': float(stats['correct'] / stats['tokens']),
            'nats_per_byte': nats_per_byte, 'bits_per_byte': nats_per_byte / math.log(2)}

  def flops_per_token(self, state) -> float:
    """Training FLOPs per token (model_zoo.models.protocol.flops_per_example over a row of seq_len)."""
    if self._flops_per_token is None:
      row = jax.tree.map(lambda x: np.asarray(x)[None], self.info.example)
      seq_len = row['inputs'].shape[1]
      self._flops_per_token = protocol.flops_per_example(
          self.model, self.variables(state), *self.model_inputs(row), **self.model_kwargs(row)) / seq_len
    return self._flops_per_token

  def throughput(self, state, steps_per_sec: float) -> dict[str, float]:
    tokens = self.config.batch_size * self.config.dataset.seq_len
    flops = self.flops_per_token(state) * tokens * steps_per_sec
    peak = perf.peak_flops(self.config.model.get('dtype', 'float32'))
    return {'tokens_per_sec': tokens * steps_per_sec, 'tflops_per_sec': flops / 1e12, 'mfu': flops / peak}

  def serving(self):
    """A decoder's two functions, the split a runtime without Python generates with (as JetStream does):
    `prefill` ({tokens [B, length] right-padded, lengths [B]} -> the next token's logits, a cache of
    `max_tokens` slots a row, each row's next position) and `decode_step` ({cache, tokens [B], positions [B]}
    -> logits, cache, positions + 1), the cache passed in and out explicitly."""
    if not isinstance(self.model, protocol.Decoder):
      return super().serving()
    size = self.config.model.get('max_len') or self.config.dataset.seq_len
    pad_id = self.info.tokenizer.pad_id

    cache_like = jax.eval_shape(lambda: protocol.init_cache(self.model, jnp.zeros((1, size), jnp.int32)))

    def prefill(variables, inputs):
      tokens_BxT, lengths_B = inputs['tokens'], inputs['lengths']
      left_BxT = sampling.right_to_left(tokens_BxT, lengths_B, pad_id)   # each row ends at the end
      logits_BxV, cache, positions_B = sampling.prefill(self.model, variables['params'], left_BxT, lengths_B, size,
                                                         cache_like=cache_like)
      return {'logits': logits_BxV, 'cache': cache, 'positions': positions_B}

    def decode_step(variables, inputs):
      logits_BxV, cache = sampling.decode_step(self.model, variables['params'], inputs['cache'], inputs['tokens'],
                                               inputs['positions'])
      return {'logits': logits_BxV, 'cache': cache, 'positions': inputs['positions'] + 1}

    def prompts(data, earlier):
      """The first tokens of four eval rows, cut to 16, 15, 8 and 1 tokens."""
      del earlier
      rows = [np.asarray(data.preprocess(data.source[i])['inputs']) for i in range(min(4, len(data.source)))]
      t = min(16, len(rows[0]))
      lengths = np.array([t, t - 1, max(t // 2, 1), 1][:len(rows)], np.int32)
      tokens = np.stack([np.where(np.arange(t) < n, r[:t], pad_id) for r, n in zip(rows, lengths)]).astype(np.int32)
      return {'tokens': tokens, 'lengths': lengths}

    def after_prefill(data, earlier):
      del data
      out = earlier['prefill'][1]
      return {'cache': out['cache'], 'tokens': np.argmax(out['logits'], -1).astype(np.int32),
              'positions': out['positions']}

    cache_specs = jax.tree.map(lambda a: Input(a.shape[1:], a.dtype), cache_like)
    notes = {'max_tokens': size, 'bos_id': self.info.tokenizer.bos_id, 'eos_id': self.info.tokenizer.eos_id}
    return {'prefill': Serving(prefill, {'tokens': Input(('length',), np.int32), 'lengths': Input((), np.int32)},
                               reference=prompts, notes=notes, constraints=(f'length <= {size}',)),
            'decode_step': Serving(decode_step, {'cache': cache_specs, 'tokens': Input((), np.int32),
                                                 'positions': Input((), np.int32)}, reference=after_prefill,
                                   notes=notes)}

  def text_batch(self, texts: list[str]) -> dict:
    """Each text as one document from its start ([BOS] text), right-padded: a batch of the model's inputs."""
    tok = self.info.tokenizer
    encoded = [([tok.bos_id] + tok.encode(t))[:self.config.dataset.seq_len] for t in texts]
    inputs = np.full((len(texts), max(map(len, encoded))), tok.pad_id, np.int32)
    segments = np.zeros_like(inputs)
    for row, ids in enumerate(encoded):
      inputs[row, :len(ids)], segments[row, :len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy()
    return {'inputs': inputs, 'positions': positions, 'segment_ids': segments}

  def generate_text(self, params, prompts: list[str], rng, *, max_new_tokens: int, temperature: float,
                    top_k: int, top_p: float, rows=None) -> list[str]:
    """Continuations of `prompts` (each starts a new document), stopping at end-of-document. `rows`
    (model_zoo.training.sharding.BatchRows) splits the prompts over the mesh, each process decoding its share."""
    if not isinstance(self.model, protocol.Decoder):
      raise UserError(f'--mode=sample decodes a token at a time, which model {self.config.model.name!r} cannot '
                      f'(it has no decode mode; see model_zoo/models/protocol.py)')
    tok = self.info.tokenizer
    encoded = [[tok.bos_id] + tok.encode(p) for p in prompts]
    width = max(map(len, encoded))
    max_len = self.config.model.get('max_len', 0)
    if self.config.model.get('positional') == 'learned' and width + max_new_tokens > max_len:
      raise UserError(f'prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model\'s '
                      f'max_len {max_len}; ask for fewer tokens')
    multiple = rows.multiple if rows else 1
    b = -(-len(prompts) // multiple) * multiple   # padded with copies of the last prompt, dropped after
    encoded += [encoded[-1]] * (b - len(encoded))
    prompt_BxT = np.full((b, width), tok.pad_id, np.int32)
    for row, ids in enumerate(encoded):
      prompt_BxT[row, width - len(ids):] = ids  # left-padded: every row ends where decoding starts
    put, get = (rows.put, rows.get) if rows else (jnp.asarray, np.asarray)
    new_BxU = sampling.generate(self.model, params, put(prompt_BxT), rng, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eos_id,
                                pad_id=tok.pad_id, lengths_B=put(np.array([len(ids) for ids in encoded], np.int32)))
    return [tok.decode(_until(row, tok.eos_id)) for row in get(new_BxU)[:len(prompts)].tolist()]
