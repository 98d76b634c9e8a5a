"""Translation: label-smoothed cross-entropy on packed pairs (teacher forcing), and decoding.

Training loss (Szegedy et al., 2016; used by Vaswani et al.): cross-entropy against
(1 - eps) * onehot(y) + eps / V, on real target tokens only. Metrics, in training and eval:
that `loss`, `nll` (plain cross-entropy, nats per target token), and token accuracy; eval adds
perplexity = exp(nll). `eval.py` also translates the
`config.decode.splits` with greedy or beam search and scores them: corpus BLEU and chrF through
sacrebleu on detokenized text, and exact match; the first split's metrics are named plainly
(`bleu`), the others' carry the split's name (`long/bleu`). The model is any encoder-decoder with
the protocol's `encode(src, ...)` and `decode_logits(z, src_segments, tgt_in, ...)` methods and a
decode mode (model_zoo.models.protocol).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.errors import UserError
from model_zoo.inference import beam_search
from model_zoo.models import protocol, registry
from model_zoo.paths import write_atomically
from model_zoo.tasks import losses
from model_zoo.tasks.base import Input, Serving, SupervisedTask


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_len', 'alpha', 'bos_id', 'eos_id',
                                             'pad_id'))
def translate_tokens(model, params, src_BxS, *, beam_size: int, max_len: int, alpha: float, bos_id: int,
                     eos_id: int, pad_id: int):
  """-> target tokens [B, max_len] (EOS, then `pad_id`): greedy if beam_size == 1, else beam search."""
  b, s = src_BxS.shape
  segments_BxS = (src_BxS != pad_id).astype(jnp.int32)
  z_BxSxD = model.apply({'params': params}, src_BxS, train=False, src_segments_BxS=segments_BxS, method='encode')
  r = b * beam_size  # rows b * J + j: each example's encoding repeated for its J hypotheses
  z_RxSxD, segments_RxS = jnp.repeat(z_BxSxD, beam_size, 0), jnp.repeat(segments_BxS, beam_size, 0)
  decoder = model.clone(decode=True)

  def step_fn(tokens_Rx1, cache, i):
    logits_Rx1xV, variables = decoder.apply(
        {'params': params, 'cache': cache}, z_RxSxD, segments_RxS, tokens_Rx1, train=False,
        tgt_positions_BxT=jnp.full((r, 1), i, jnp.int32), method='decode_logits', mutable=['cache'])
    return logits_Rx1xV[:, 0], variables['cache']

  cache = protocol.init_cache(model, jnp.ones((r, s), jnp.int32), jnp.ones((r, max_len), jnp.int32))
  kw = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  if beam_size == 1:
    return beam_search.greedy_search(step_fn, cache, b, **kw)
  return beam_search.beam_search(step_fn, cache, b, beam_size=beam_size, alpha=alpha, **kw)[0]


def corpus_scores(hypotheses: list[str], references: list[str], bleu_tokenize: str) -> dict:
  """Corpus BLEU and chrF (sacrebleu, detokenized input), exact match, and BLEU's signature."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  bleu = sacrebleu.metrics.BLEU(tokenize=bleu_tokenize)
  chrf = sacrebleu.metrics.CHRF()
  return {'bleu': bleu.corpus_score(hypotheses, [references]).score,
          'chrf': chrf.corpus_score(hypotheses, [references]).score,
          'exact_match': float(np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)])),
          'bleu_signature': str(bleu.get_signature())}


class TranslationTask(SupervisedTask):
  """Batches hold the packed rows of model_zoo.data.translation."""
  interpretations = ('attention',)   # the cross-attention as an alignment
  logged_only = ('accuracy',)   # over the vocabulary: on logged steps only

  @classmethod
  def check_config(cls, config):
    d = config.decode
    if d.beam_size < 1 or d.max_len < 1 or d.alpha < 0:
      raise UserError(f'config.decode needs beam_size >= 1, max_len >= 1 and alpha >= 0; got {d.beam_size}, '
                      f'{d.max_len}, {d.alpha}')
    if not 0 <= config.label_smoothing < 1:
      raise UserError(f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}')
    import sacrebleu  # pylint: disable=g-import-not-at-top
    if d.bleu_tokenize and d.bleu_tokenize not in sacrebleu.metrics.BLEU.TOKENIZERS:
      raise UserError(f'config.decode.bleu_tokenize={d.bleu_tokenize!r} is not a sacrebleu tokenizer; one of '
                      f'{", ".join(sacrebleu.metrics.BLEU.TOKENIZERS)} (or \'\' for the data set\'s own)')
    m, ds = config.model, config.dataset
    if m.positional == 'learned' and max(ds.src_len, ds.tgt_len, d.max_len) > m.max_len:
      raise UserError(f'learned positions cover model.max_len={m.max_len} tokens, but dataset.src_len='
                      f'{ds.src_len}, dataset.tgt_len={ds.tgt_len} and decode.max_len={d.max_len}; raise '
                      f'model.max_len or use sinusoidal positions')

  def build_model(self):
    if self.info.tokenizer.vocab_size != self.config.dataset.vocab_size:
      raise UserError(f'config.dataset.vocab_size={self.config.dataset.vocab_size} but the tokenizer has '
                      f'{self.info.tokenizer.vocab_size} tokens; set them equal')
    return registry.build(self.config.model, vocab_size=self.config.dataset.vocab_size)

  def model_inputs(self, batch):
    return (batch['src'], batch['tgt_in'])

  def model_kwargs(self, batch):
    return {'src_segments_BxS': batch['src_segments'], 'src_positions_BxS': batch['src_positions'],
            'tgt_segments_BxT': batch['tgt_segments'], 'tgt_positions_BxT': batch['tgt_positions']}

  def _sums(self, logits_BxTxV, batch, w_BxT):
    """Summed label-smoothed loss, plain cross-entropy and correct predictions over weighted tokens."""
    return losses.token_sums(logits_BxTxV, batch['tgt_out'], w_BxT, self.config.label_smoothing)

  def loss_from_outputs(self, logits_BxTxV, batch):
    metrics = losses.means(self._sums(logits_BxTxV, batch, self.output_weights(batch)), nll=True)
    return metrics['loss'], {k: metrics[k] for k in ('loss', 'nll', 'accuracy')}

  def output_weights(self, batch):
    return (batch['tgt_segments'] != 0).astype(jnp.float32)

  def loss_weight(self, batch):
    return jnp.sum(batch['tgt_segments'] != 0).astype(jnp.float32)

  def eval_step(self, state, batch):
    return self._sums(self.predict(state, batch), batch, (batch['tgt_segments'] != 0) * batch['mask'][:, None])

  def eval_metrics(self, stats):
    """loss: label-smoothed, as in training; nll: plain cross-entropy (nats per target token)."""
    nll = float(stats['nll_sum'] / stats['count'])
    return {'loss': float(stats['loss_sum'] / stats['count']), 'nll': nll,
            'perplexity': losses.perplexity(nll), 'accuracy': float(stats['correct'] / stats['count'])}

  def throughput(self, state, steps_per_sec):
    del state
    rows = self.config.batch_size * steps_per_sec
    return {'tokens_per_sec': rows * (self.config.dataset.src_len + self.config.dataset.tgt_len)}

  def serving(self):
    """Greedy or sampled decoding split in two, the cache passed in and out explicitly: `prefill` ({source
    [B, source_length], padded with pad_id} -> the encoder's output and the source's padding mask, the logits
    of the first target token (after BOS), the decoder's cache of `max_tokens` slots, positions) and
    `decode_step` ({encoded, source_segments, cache, tokens [B], positions [B]} -> logits, cache, positions + 1)."""
    model, tok, size = self.model, self.info.tokenizer, self.config.decode.max_len

    cache_like = jax.eval_shape(lambda: protocol.init_cache(model, jnp.ones((1, 8), jnp.int32),
                                                            jnp.ones((1, size), jnp.int32)))

    def prefill(variables, inputs):
      params, src_BxS = variables['params'], inputs['source']
      b = src_BxS.shape[0]
      segments_BxS = (src_BxS != tok.pad_id).astype(jnp.int32)
      z_BxSxD = model.apply({'params': params}, src_BxS, train=False, src_segments_BxS=segments_BxS,
                            method='encode')
      # Zero at padding: what attention gives a row with nothing to attend to differs between runtimes, and
      # the decoder never reads it.
      z_BxSxD = jnp.where(segments_BxS[..., None] != 0, z_BxSxD, 0).astype(z_BxSxD.dtype)
      cache = protocol.empty_cache(cache_like, b)
      zeros_B = jnp.zeros((b,), jnp.int32)
      first = decode_step(variables, {'encoded': z_BxSxD, 'source_segments': segments_BxS, 'cache': cache,
                                      'tokens': zeros_B + tok.bos_id, 'positions': zeros_B})
      return {**first, 'encoded': z_BxSxD, 'source_segments': segments_BxS}

    def decode_step(variables, inputs):
      logits_Bx1xV, out = model.clone(decode=True).apply(
          {'params': variables['params'], 'cache': inputs['cache']}, inputs['encoded'], inputs['source_segments'],
          inputs['tokens'][:, None], train=False, tgt_positions_BxT=inputs['positions'][:, None],
          method='decode_logits', mutable=['cache'])
      return {'logits': logits_Bx1xV[:, 0], 'cache': out['cache'], 'positions': inputs['positions'] + 1}

    def sources(data, earlier):
      """Four eval sources, tokenized and padded to the longest."""
      del earlier
      ids = tok.encode_batch([src for src, _ in list(data.raw)[:4]])
      src = np.full((len(ids), max(map(len, ids))), tok.pad_id, np.int32)
      for row, x in enumerate(ids):
        src[row, :len(x)] = x
      return {'source': src}

    def after_prefill(data, earlier):
      del data
      out = earlier['prefill'][1]
      return {'encoded': out['encoded'], 'source_segments': out['source_segments'], 'cache': out['cache'],
              'tokens': np.argmax(out['logits'], -1).astype(np.int32), 'positions': out['positions']}

    encoded = jax.eval_shape(lambda p: model.apply({'params': p}, jnp.ones((1, 8), jnp.int32), train=False,
                                                   method='encode'), self._abstract_params())
    notes = {'max_tokens': size, 'max_source_tokens': self.config.dataset.src_len, 'bos_id': tok.bos_id,
             'eos_id': tok.eos_id, 'pad_id': tok.pad_id}
    limit = (f'source_length <= {self.config.model.max_len}',) if self.config.model.positional == 'learned' else ()
    return {'prefill': Serving(prefill, {'source': Input(('source_length',), np.int32)}, reference=sources,
                               notes=notes, constraints=limit),
            'decode_step': Serving(decode_step, {
                'encoded': Input(('source_length', encoded.shape[-1]), encoded.dtype),
                'source_segments': Input(('source_length',), np.int32),
                'cache': jax.tree.map(lambda a: Input(a.shape[1:], a.dtype), cache_like),
                'tokens': Input((), np.int32), 'positions': Input((), np.int32)},
                reference=after_prefill, notes=notes, constraints=limit)}

  def _abstract_params(self):
    example = jax.tree.map(lambda x: np.asarray(x)[None], self.info.example)
    return jax.eval_shape(lambda: self.model.init(jax.random.key(0), *self.model_inputs(example), train=False,
                                                  **self.model_kwargs(example)))['params']

  def translate(self, params, texts: list[str], rows=None) -> list[str]:
    """Translations of `texts`, decoded as config.decode says, in batches of config.batch_size. `rows`
    (model_zoo.training.sharding.BatchRows) splits each batch over the mesh, each process decoding its share."""
    tok, d, size = self.info.tokenizer, self.config.decode, self.config.batch_size
    out = []
    for lo in range(0, len(texts), size):
      ids = tok.encode_batch(texts[lo:lo + size])
      longest, max_len = max(1, max(map(len, ids))), self.config.model.max_len
      if self.config.model.positional == 'learned' and max(longest, d.max_len) > max_len:
        raise UserError(f'a source of {longest} tokens or config.decode.max_len={d.max_len} exceeds the '
                        f'model\'s max_len {max_len} (learned positions)')
      width = min(-(-longest // 16) * 16, max_len if self.config.model.positional == 'learned' else 1 << 30)
      src_BxS = np.full((size, width), tok.pad_id, np.int32)  # the last batch padded with empty rows
      for row, x in enumerate(ids):
        src_BxS[row, :len(x)] = x
      put, get = (rows.put, rows.get) if rows else (jnp.asarray, np.asarray)
      tokens_BxU = translate_tokens(self.model, params, put(src_BxS), beam_size=d.beam_size,
                                    max_len=d.max_len, alpha=d.alpha, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id)
      for row in get(tokens_BxU)[:len(ids)].tolist():
        end = row.index(tok.eos_id) if tok.eos_id in row else len(row)
        out.append(tok.decode(row[:end]))
    return out

  def text_batch(self, sources: list[str], targets: list[str]) -> dict:
    """One (source, target) pair a row, as the model reads it in teacher forcing: tgt_in = [BOS] target,
    tgt_out = target [EOS]; right-padded, no packing."""
    tok = self.info.tokenizer
    src = [tok.encode(s) for s in sources]
    tgt = [tok.encode(t) for t in targets]
    s_len, t_len = max(map(len, src)), max(map(len, tgt)) + 1
    batch = {k: np.zeros((len(src), n), np.int32) for k, n in (('src', s_len), ('src_segments', s_len),
                                                                  ('tgt_in', t_len), ('tgt_out', t_len),
                                                                  ('tgt_segments', t_len))}
    for row, (x, y) in enumerate(zip(src, tgt)):
      batch['src'][row, :len(x)], batch['src_segments'][row, :len(x)] = x, 1
      batch['tgt_in'][row, :len(y) + 1], batch['tgt_out'][row, :len(y) + 1] = [tok.bos_id] + y, y + [tok.eos_id]
      batch['tgt_segments'][row, :len(y) + 1] = 1
    batch['src_positions'] = np.broadcast_to(np.arange(s_len, dtype=np.int32), (len(src), s_len)).copy()
    batch['tgt_positions'] = np.broadcast_to(np.arange(t_len, dtype=np.int32), (len(src), t_len)).copy()
    return batch

  def decode_splits(self) -> tuple[str, ...]:
    splits = self.config.decode.splits or self.info.meta.get('decode_splits', '')
    return tuple(s for s in splits.split(',') if s)

  def decode_metrics(self, state, data, workdir, scorers=None, rows=None) -> dict[str, float]:
    del scorers   # each process decodes its share of every batch (rows), and every process gets all of them
    tokenize = self.config.decode.bleu_tokenize or self.info.meta.get('bleu_tokenize', '13a')
    metrics = {}
    for n, split in enumerate(self.decode_splits()):
      pairs = data[split].raw
      sources, references = [s for s, _ in pairs], [t for _, t in pairs]
      hypotheses = self.translate(state.params, sources, rows=rows)
      scores = corpus_scores(hypotheses, references, tokenize)
      prefix = '' if n == 0 else f'{split}/'
      metrics.update({prefix + k: v for k, v in scores.items() if k != 'bleu_signature'})
      metrics['bleu_signature'] = scores['bleu_signature']
      if jax.process_index() == 0:
        lines = ['source\treference\thypothesis\n'] + [f'{s}\t{r}\t{h}\n' for s, r, h in zip(sources, references, hypotheses)]
        write_atomically(workdir.translations(split), ''.join(lines).encode())
      print(f'{split}: {len(pairs)} pairs, BLEU {scores["bleu"]:.2f}, chrF {scores["chrf"]:.2f}, exact match '
            f'{scores["exact_match"]:.4f} ({scores["bleu_signature"]})', flush=True)
      for s, r, h in list(zip(sources, references, hypotheses))[:3]:
        print(f'  {s!r} -> {h!r} (reference {r!r})', flush=True)
    return metrics
