"""Translation: label-smoothed cross-entropy on packed pairs (teacher forcing), and decoding.

Training loss (Szegedy et al., 2016; used by Vaswani et al.): cross-entropy against
(1 - eps) * onehot(y) + eps / V, on real target tokens only. Metrics, in training and eval:
that `loss`, `nll` (plain cross-entropy, nats per target token), and token accuracy; eval adds
perplexity = exp(nll). `eval.py` also translates the
`config.decode.splits` with greedy or beam search and scores them: corpus BLEU and chrF through
sacrebleu on detokenized text, and exact match; the first split's metrics are named plainly
(`bleu`), the others' carry the split's name (`long/bleu`).
"""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model_zoo import models
from model_zoo.data import translation as translation_data
from model_zoo.errors import UserError
from model_zoo.inference import beam_search
from model_zoo.models import transformer
from model_zoo.tasks.base import SupervisedTask


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_len', 'alpha', 'bos_id', 'eos_id',
                                             'pad_id'))
def translate_tokens(model, params, src_BxS, *, beam_size: int, max_len: int, alpha: float, bos_id: int,
                     eos_id: int, pad_id: int):
  """-> target tokens [B, max_len] (EOS, then `pad_id`): greedy if beam_size == 1, else beam search."""
  b, s = src_BxS.shape
  segments_BxS = (src_BxS != pad_id).astype(jnp.int32)
  z_BxSxD = model.apply({'params': params}, src_BxS, train=False, src_segments_BxS=segments_BxS,
                        method=transformer.Transformer.encode)
  n = b * beam_size  # rows b * K + k: each example's encoding repeated for its K hypotheses
  z_NxSxD, segments_NxS = jnp.repeat(z_BxSxD, beam_size, 0), jnp.repeat(segments_BxS, beam_size, 0)
  decoder = model.clone(decode=True)

  def step_fn(tokens_Nx1, cache, i):
    logits_Nx1xV, variables = decoder.apply(
        {'params': params, 'cache': cache}, z_NxSxD, segments_NxS, tokens_Nx1, train=False,
        tgt_positions_BxT=jnp.full((n, 1), i, jnp.int32), method=transformer.Transformer.decode_logits,
        mutable=['cache'])
    return logits_Nx1xV[:, 0], variables['cache']

  cache = transformer.init_cache(model, n, s, max_len)
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

  def build_model(self):
    if self.data.tokenizer.vocab_size != self.config.dataset.vocab_size:
      raise UserError(f'config.dataset.vocab_size={self.config.dataset.vocab_size} but the tokenizer has '
                      f'{self.data.tokenizer.vocab_size} tokens; set them equal')
    d = self.config.decode
    if d.beam_size < 1 or d.max_len < 1 or d.alpha < 0:
      raise UserError(f'config.decode needs beam_size >= 1, max_len >= 1 and alpha >= 0; got {d.beam_size}, '
                      f'{d.max_len}, {d.alpha}')
    if not 0 <= self.config.label_smoothing < 1:
      raise UserError(f'config.label_smoothing must be in [0, 1), got {self.config.label_smoothing}')
    m, ds = self.config.model, self.config.dataset
    if m.positional == 'learned' and max(ds.src_len, ds.tgt_len, d.max_len) > m.max_len:
      raise UserError(f'learned positions cover model.max_len={m.max_len} tokens, but dataset.src_len='
                      f'{ds.src_len}, dataset.tgt_len={ds.tgt_len} and decode.max_len={d.max_len}; raise '
                      f'model.max_len or use sinusoidal positions')
    return models.build(self.config.model, vocab_size=self.config.dataset.vocab_size)

  def model_inputs(self, batch):
    return (batch['src'], batch['tgt_in'])

  def _logits(self, params, batch, *, train, rng=None):
    return self.model.apply(
        {'params': params}, batch['src'], batch['tgt_in'], train=train, src_segments_BxS=batch['src_segments'],
        src_positions_BxS=batch['src_positions'], tgt_segments_BxT=batch['tgt_segments'],
        tgt_positions_BxT=batch['tgt_positions'], rngs={'dropout': rng} if train else {})

  def _sums(self, logits_BxTxV, batch, w_BxT):
    """Summed label-smoothed loss, plain cross-entropy and correct predictions over weighted tokens."""
    labels_BxTxV = optax.smooth_labels(jax.nn.one_hot(batch['tgt_out'], logits_BxTxV.shape[-1]),
                                       self.config.label_smoothing)
    return {'loss_sum': jnp.sum(optax.softmax_cross_entropy(logits_BxTxV, labels_BxTxV) * w_BxT),
            'nll_sum': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch['tgt_out'])
                               * w_BxT),
            'correct': jnp.sum((jnp.argmax(logits_BxTxV, -1) == batch['tgt_out']) * w_BxT),
            'tokens': jnp.sum(w_BxT)}

  def loss_fn(self, params, model_state, batch, rng):
    logits_BxTxV = self._logits(params, batch, train=True, rng=rng)
    sums = self._sums(logits_BxTxV, batch, (batch['tgt_segments'] != 0).astype(jnp.float32))
    denom = jnp.maximum(sums['tokens'], 1.0)
    loss = sums['loss_sum'] / denom
    return loss, ({'loss': loss, 'nll': sums['nll_sum'] / denom, 'accuracy': sums['correct'] / denom},
                  model_state)

  def eval_step(self, state, batch):
    logits_BxTxV = self._logits(state.params, batch, train=False)
    return self._sums(logits_BxTxV, batch, (batch['tgt_segments'] != 0) * batch['mask'][:, None])

  def eval_metrics(self, stats):
    """loss: label-smoothed, as in training; nll: plain cross-entropy (nats per target token)."""
    nll = float(stats['nll_sum'] / stats['tokens'])
    return {'loss': float(stats['loss_sum'] / stats['tokens']), 'nll': nll,
            'perplexity': math.exp(min(nll, 700.0)), 'accuracy': float(stats['correct'] / stats['tokens'])}

  def throughput(self, state, steps_per_sec):
    del state
    rows = self.config.batch_size * steps_per_sec
    return {'tokens_per_sec': rows * (self.config.dataset.src_len + self.config.dataset.tgt_len)}

  def translate(self, params, texts: list[str]) -> list[str]:
    """Translations of `texts`, decoded as config.decode says, in batches of config.batch_size."""
    tok, d, rows = self.data.tokenizer, self.config.decode, self.config.batch_size
    out = []
    for lo in range(0, len(texts), rows):
      ids = tok.encode_batch(texts[lo:lo + rows])
      longest, max_len = max(1, max(map(len, ids))), self.config.model.max_len
      if self.config.model.positional == 'learned' and max(longest, d.max_len) > max_len:
        raise UserError(f'a source of {longest} tokens or config.decode.max_len={d.max_len} exceeds the '
                        f'model\'s max_len {max_len} (learned positions)')
      width = min(-(-longest // 16) * 16, max_len if self.config.model.positional == 'learned' else 1 << 30)
      src_BxS = np.full((rows, width), tok.pad_id, np.int32)  # the last batch padded with empty rows
      for row, x in enumerate(ids):
        src_BxS[row, :len(x)] = x
      tokens_BxL = translate_tokens(self.model, params, jnp.asarray(src_BxS), beam_size=d.beam_size,
                                    max_len=d.max_len, alpha=d.alpha, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id)
      for row in np.asarray(tokens_BxL)[:len(ids)].tolist():
        end = row.index(tok.eos_id) if tok.eos_id in row else len(row)
        out.append(tok.decode(row[:end]))
    return out

  def decode_metrics(self, state, outdir: str) -> dict[str, float]:
    name = self.config.dataset.name
    splits = [s for s in (self.config.decode.splits or translation_data.decode_splits(name)).split(',') if s]
    tokenize = self.config.decode.bleu_tokenize or translation_data.bleu_tokenize(name)
    metrics = {}
    for n, split in enumerate(splits):
      pairs = translation_data.pairs(self.config.dataset, split)
      sources, references = [s for s, _ in pairs], [t for _, t in pairs]
      hypotheses = self.translate(state.params, sources)
      scores = corpus_scores(hypotheses, references, tokenize)
      prefix = '' if n == 0 else f'{split}/'
      metrics.update({prefix + k: v for k, v in scores.items() if k != 'bleu_signature'})
      metrics['bleu_signature'] = scores['bleu_signature']
      if jax.process_index() == 0:
        with open(os.path.join(outdir, f'translations-{split}.tsv'), 'w') as f:
          f.write('source\treference\thypothesis\n')
          f.writelines(f'{s}\t{r}\t{h}\n' for s, r, h in zip(sources, references, hypotheses))
      print(f'{split}: {len(pairs)} pairs, BLEU {scores["bleu"]:.2f}, chrF {scores["chrf"]:.2f}, exact match '
            f'{scores["exact_match"]:.4f} ({scores["bleu_signature"]})', flush=True)
      for s, r, h in list(zip(sources, references, hypotheses))[:3]:
        print(f'  {s!r} -> {h!r} (reference {r!r})', flush=True)
    return metrics
