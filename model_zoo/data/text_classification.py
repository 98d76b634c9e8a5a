"""Text classification data and masked-LM examples, for BERT pretraining and fine-tuning.

Data sets:
  pydoc_topics   offline: which CPython documentation topic (`pydoc_data.topics`, the GPT corpus)
                 a passage of 40 words comes from. pydoc repeats text between topics ('compound'
                 holds 'if', 'while', ...), so every paragraph is first given to the smallest topic
                 that holds it and dropped from the others; each topic's own words are then cut
                 into passages. The topics with at least 16 passages are the classes (the others'
                 passages are unlabelled text for masked-LM pretraining only). Each passage goes to
                 test (20%), validation (10%) or train by a hash of its topic and index, so test
                 passages are seen by neither pretraining nor fine-tuning.
  pydoc_topic_spans  offline token classification (the extractive-QA kind of head): a row holds
                 two passages of different topics, back to back, and every token is labelled with
                 its passage's topic, so the model must find where one passage ends and name both.
                 Passage i of a split is followed by the next passage (in a fixed shuffle of the
                 split) of another topic. `labels` [L] and `weights` [L] (0 on [CLS], [SEP], padding).
  glue/sst2, imdb_reviews   TFDS (on disk, or config.dataset.download=True).

An example is `inputs` = [CLS] tokens [SEP] padded to `seq_len`, `segment_ids` (1 on real tokens,
0 on padding), `type_ids` (zeros: one sentence) and `label`. The tokenizer is SentencePiece trained
on the training split with a `<mask>` symbol (ids: pad 0, [CLS] = BOS 1, [SEP] = EOS 2, unk 3,
<mask> 4), or a Hugging Face tokenizer (`config.dataset.tokenizer='hf:<dir>'`).

Masked LM (`config.dataset.mlm_probability` > 0; Devlin et al., 2019, sec. 3.1): that share of
the real tokens of each row (rounded, at least one) is chosen; of those, 80% become <mask>, 10% a
random token and 10% stay. `targets` are the original tokens and `weights` 1 on the chosen ones.
Every split's source masks each example with a generator keyed by its index, so evaluation is
fixed; the training pipeline masks again, from the original tokens, with the seed and the
example's position in the stream (new masks every epoch; resumable; the same for any number of
processes).
"""
import collections
import dataclasses
import functools
import hashlib
import math

import ml_collections
import numpy as np

from model_zoo.data import tokenizers
from model_zoo.data.base import Dataset, Files, LazyColumn, hash_bucket, tfds_label_names, tfds_source, to_str
from model_zoo.errors import UserError

MASK_PIECE = '<mask>'
PASSAGE_WORDS = 40
MIN_PASSAGES = 16
SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class Passage:
  topic: str
  split: str
  text: str


def _split_of(key: str) -> str:
  bucket = hash_bucket(key, 10)
  return 'test' if bucket < 2 else 'validation' if bucket == 2 else 'train'


@functools.cache
def pydoc_passages() -> tuple[tuple[Passage, ...], tuple[str, ...]]:
  """All passages of the CPython documentation topics, and the topics that are classes."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  paragraphs = {name: [' '.join(p.split()) for p in body.split('\n\n') if p.strip()]
                for name, body in topics.items()}
  size = {name: len(body.split()) for name, body in topics.items()}
  owner = {}
  for name in sorted(paragraphs, key=lambda n: (size[n], n)):  # the smallest topic holding it wins
    for p in paragraphs[name]:
      owner.setdefault(p, name)
  passages = []
  for name in sorted(paragraphs):
    words = [w for p in dict.fromkeys(paragraphs[name]) if owner[p] == name for w in p.split()]
    for i in range(len(words) // PASSAGE_WORDS):
      chunk = ' '.join(words[i * PASSAGE_WORDS:(i + 1) * PASSAGE_WORDS])
      passages.append(Passage(name, _split_of(f'{name}/{i}'), chunk))
  counts = collections.Counter(p.topic for p in passages)
  classes = tuple(sorted(t for t, n in counts.items() if n >= MIN_PASSAGES))
  return tuple(passages), classes


def pydoc_topics(config, split: str, labelled: bool):
  """(texts, labels, class names) of a pydoc_topics split; without `labelled`, unlabelled passages too
  (label -1), for masked-LM pretraining."""
  if split not in SPLITS:
    raise UserError(f'data set {config.name} has no split {split!r}; it has: {", ".join(SPLITS)}')
  passages, classes = pydoc_passages()
  index = {c: i for i, c in enumerate(classes)}
  chosen = [p for p in passages if p.split == split and (p.topic in index or not labelled)]
  k = config.get('labels_per_class', 0)
  if labelled and k and split == config.train_split:  # few labels: k passages a class, a fixed choice
    ordered = sorted(chosen, key=lambda p: hashlib.sha256(p.text.encode('utf-8')).digest())
    count, chosen = collections.Counter(), []
    for p in ordered:
      count[p.topic] += 1
      if count[p.topic] <= k:
        chosen.append(p)
  return [p.text for p in chosen], np.array([index.get(p.topic, -1) for p in chosen], np.int32), classes


def tfds_text(name: str, text_key: str, splits: dict[str, str]):
  """A reader of the TFDS text classification data set `name` (features `text_key` and label)."""
  def read(config, split: str, labelled: bool):
    del labelled
    if split not in splits:
      raise UserError(f'data set {name} has no split {split!r}; it has: {", ".join(splits)}')
    source = tfds_source(config, name, splits[split], offline_alternative='pydoc_topics')
    examples = LazyColumn(source, lambda ex: (to_str(ex[text_key]), int(ex['label']))).take(range(len(source)))
    return [t for t, _ in examples], np.array([y for _, y in examples], np.int32), tfds_label_names(config, name)
  return read


def tokenizer(dataset_config, files, train_texts):
  """`tokenizer='hf:<dir>'`: that Hugging Face tokenizer; else SentencePiece with a <mask> symbol."""
  kind = dataset_config.tokenizer
  if kind.startswith('hf:'):
    return tokenizers.build(dataset_config, files, train_texts)
  if kind != 'sentencepiece':
    raise UserError(f"config.dataset.tokenizer must be 'sentencepiece' or 'hf:<directory>' for "
                    f'{dataset_config.name}, got {kind!r}')
  tok = tokenizers.build(dataset_config, files, train_texts, user_symbols=(MASK_PIECE,))
  if tok.mask_id is None:
    raise UserError(f'{tok.path} has no {MASK_PIECE} token: it was trained for another task; use a new --workdir')
  return tok


def encode(ids, seq_len: int, tok) -> dict:
  """[CLS] ids [SEP], cut and padded to seq_len."""
  ids = [tok.bos_id] + list(ids)[:seq_len - 2] + [tok.eos_id]
  inputs = np.full(seq_len, tok.pad_id, np.int32)
  inputs[:len(ids)] = ids
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:len(ids)] = 1
  return {'inputs': inputs, 'segment_ids': segment_ids, 'type_ids': np.zeros(seq_len, np.int32)}


def mask_tokens(example: dict, rng: np.random.Generator, *, probability: float, mask_id: int,
                vocab_size: int, special_ids: tuple[int, ...], first_random_id: int) -> dict:
  """BERT's 80/10/10 masking of `example['inputs']` (see the module doc). Adds `targets` (the original
  tokens), `weights` (1 where chosen) and, for a head that reads the chosen positions only,
  `mlm_positions` and `mlm_weights`, padded to ceil(probability * seq_len) entries.
  Random replacements are drawn from [first_random_id, vocab_size)."""
  inputs = example.get('targets', example['inputs'])  # the original tokens, if already masked once
  candidates = np.flatnonzero((example['segment_ids'] != 0) & ~np.isin(inputs, special_ids))
  n = min(len(candidates), max(1, round(len(candidates) * probability)))
  chosen = np.sort(rng.permutation(candidates)[:n])
  action = rng.random(n)
  masked = inputs.copy()
  masked[chosen[action < 0.8]] = mask_id
  random_at = chosen[(action >= 0.8) & (action < 0.9)]
  masked[random_at] = rng.integers(first_random_id, vocab_size, len(random_at))
  weights = np.zeros(len(inputs), np.float32)
  weights[chosen] = 1.0
  width = math.ceil(probability * len(inputs))
  positions, position_weights = np.zeros(width, np.int32), np.zeros(width, np.float32)
  positions[:n], position_weights[:n] = chosen, 1.0
  return {**example, 'inputs': masked, 'targets': inputs, 'weights': weights, 'mlm_positions': positions,
          'mlm_weights': position_weights}


class _SpanExamples:
  """pydoc_topic_spans rows: two passages of different topics, each token labelled with its topic."""

  def __init__(self, texts, labels, tok, seq_len):
    self.texts, self.labels, self.tok, self.seq_len = texts, labels, tok, seq_len
    order = np.random.default_rng(0).permutation(len(texts))
    self.partner = np.empty(len(texts), np.int64)
    for rank, i in enumerate(order):  # the next passage in the shuffle whose topic differs
      j = next(order[(rank + k) % len(order)] for k in range(1, len(order)) if labels[order[(rank + k) % len(order)]]
               != labels[i])
      self.partner[i] = j

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, i):
    a, b = self.tok.encode(self.texts[i]), self.tok.encode(self.texts[self.partner[i]])
    ex = encode(a + b, self.seq_len, self.tok)
    labels = np.zeros(self.seq_len, np.int32)
    labels[1:1 + len(a)] = self.labels[i]
    labels[1 + len(a):1 + len(a) + len(b)] = self.labels[self.partner[i]]
    weights = ex['segment_ids'].astype(np.float32)
    weights[0] = 0.0
    weights[int(ex['segment_ids'].sum()) - 1] = 0.0   # [SEP]
    return {**ex, 'labels': labels, 'weights': weights}


class _Examples:
  """Encoded examples of a split; with `mask` (evaluation), masked by a generator keyed by index."""

  def __init__(self, texts, labels, tok, seq_len, mask=None):
    self.texts, self.labels, self.tok, self.seq_len, self.mask = texts, labels, tok, seq_len, mask

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, i):
    ex = {**encode(self.tok.encode(self.texts[i]), self.seq_len, self.tok), 'label': self.labels[i]}
    return ex if self.mask is None else self.mask(ex, np.random.default_rng([i, 0x6D6C6D]))


def text_classification(read, spans: bool = False):
  """A loader of classification rows (or, with `spans`, rows of two passages labelled per token) from
  `read(config, split, labelled) -> (texts, labels, class names)`; with config.mlm_probability > 0,
  of masked-LM rows."""

  def load(dataset_config: ml_collections.ConfigDict, split: str, files: Files | None = None) -> Dataset:
    seq_len, p = dataset_config.seq_len, dataset_config.get('mlm_probability', 0.0)
    if not isinstance(seq_len, int) or seq_len < 3:
      raise UserError(f'config.dataset.seq_len must be an integer >= 3, got {seq_len!r}')
    if not 0 <= p < 1:
      raise UserError(f'config.dataset.mlm_probability must be in [0, 1), got {p}')
    if spans and p:
      raise UserError(f'config.dataset.mlm_probability must be 0 for {dataset_config.name} (a labelling task); '
                      f'pretrain on pydoc_topics')
    texts, labels, classes = read(dataset_config, split, p == 0)  # first: a bad split fails before training
    # The tokenizer learns from all the training split's text, labelled or not: pretraining and
    # fine-tuning (from scratch or not, with few labels or all) get the same one.
    tok = tokenizer(dataset_config, files, lambda: read(dataset_config, dataset_config.train_split, False)[0])
    if spans:
      return Dataset(_SpanExamples(texts, labels, tok, seq_len), lambda ex: ex, len(classes), classes, tokenizer=tok)
    if p == 0:
      return Dataset(_Examples(texts, labels, tok, seq_len), lambda ex: ex, len(classes), classes, tokenizer=tok)
    if getattr(tok, 'mask_id', None) is None:
      raise UserError(f'masked-LM pretraining needs a tokenizer with a mask token; {dataset_config.tokenizer} '
                      f'has none')
    mask = functools.partial(mask_tokens, probability=p, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                             special_ids=(tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id),
                             first_random_id=tok.mask_id + 1)
    return Dataset(_Examples(texts, labels, tok, seq_len, mask=mask), lambda ex: ex, tokenizer=tok, augment=mask)
  return load
