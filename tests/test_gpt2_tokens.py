"""A GPT-2-shaped tokenizer: byte-level BPE whose one special token, <|endoftext|>, is the last id (as
GPT-2's 50256 is) and is BOS, EOS and padding at once. Packing must still count every real target
once, and sampling must keep the prompt's BOS at position 0 (not mistake it for padding)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.data import packing, tokenizers
from model_zoo.models.gpt import GPT
from model_zoo.tasks.language_modeling import LanguageModelingTask
from model_zoo.data.base import DataInfo
from helpers import tiny_config

DOCS = ['the cat sat on the mat', 'a dog', '', 'the quick brown fox jumps over the lazy dog again and again',
        'x', 'cats and dogs and cats']


@pytest.fixture(scope='module')
def gpt2_tokenizer(tmp_path_factory):
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('gpt2')
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(DOCS * 3, vocab_size=300, min_frequency=1, show_progress=False)
  bpe.save_model(str(directory))
  vocab = json.load(open(directory / 'vocab.json'))
  vocab['<|endoftext|>'] = len(vocab)          # the last id, as in GPT-2
  json.dump(vocab, open(directory / 'vocab.json', 'w'))
  tok = tokenizers.HFTokenizer(str(directory))
  assert tok.pad_id == tok.bos_id == tok.eos_id == len(vocab) - 1 > 0
  return tok


def test_packing_counts_every_target_once(gpt2_tokenizer):
  tok = gpt2_tokenizer
  stream = packing.encode_documents(DOCS, tok, None)
  lengths = [len(tok.encode(d)) for d in DOCS]
  for seq_len in (4, 7, 16, 64):
    rows = packing.PackedRows(stream, seq_len, tok.bos_id, tok.pad_id, tok.eos_id)
    assert list(rows.doc_starts) == list(np.cumsum([0] + [n + 2 for n in lengths[:-1]]))
    counted = []   # (document, target) of every weighted target, over all rows
    for i in range(len(rows)):
      row = rows[i]
      for t in np.flatnonzero(row['weights']):
        at = i * seq_len + t + 1                    # the target's index in the stream
        doc = int(np.searchsorted(rows.doc_starts, at, 'right')) - 1
        counted.append((doc, at - rows.doc_starts[doc]))
        assert row['targets'][t] == stream[at]
        assert row['segment_ids'][t] > 0 and row['positions'][t] == at - 1 - max(rows.doc_starts[doc], i * seq_len)
    # each document's tokens and its EOS: positions 1 .. n + 1 after its BOS, each exactly once
    assert sorted(counted) == [(d, p) for d, n in enumerate(lengths) for p in range(1, n + 2)]
    assert len(counted) == sum(lengths) + len(DOCS)


def test_a_document_holding_the_special_token_is_refused(gpt2_tokenizer):
  stream = packing.encode_documents(['one <|endoftext|> two', 'three'], gpt2_tokenizer, None)
  with pytest.raises(Exception, match='contains the tokenizer.s BOS/EOS token'):
    packing.PackedRows(stream, 8, gpt2_tokenizer.bos_id, gpt2_tokenizer.pad_id, gpt2_tokenizer.eos_id)


def test_greedy_sampling_keeps_bos_at_position_0(gpt2_tokenizer):
  tok = gpt2_tokenizer
  config = tiny_config('gpt', **{'dataset.vocab_size': tok.vocab_size, 'model.num_layers': 2, 'model.d_model': 32,
                                 'model.num_heads': 2, 'model.d_ff': 64, 'model.max_len': 64,
                                 'model.positional': 'learned'})
  example = {'inputs': np.zeros(8, np.int32), 'targets': np.zeros(8, np.int32),
             'segment_ids': np.ones(8, np.int32), 'positions': np.arange(8, dtype=np.int32),
             'weights': np.ones(8, np.float32)}
  task = LanguageModelingTask(config, DataInfo(example=example, tokenizer=tok))
  model = task.model
  assert isinstance(model, GPT)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32), train=False)['params']
  params = jax.tree.map(lambda p: p * 3.0, params)   # sharper logits: no near-ties for argmax
  prompts, new = ['the cat', 'a quick brown dog jumps'], 6
  texts = task.generate_text(params, prompts, jax.random.key(0), max_new_tokens=new, temperature=0.0, top_k=0,
                             top_p=1.0)
  full = jax.jit(lambda t: model.apply({'params': params}, t, train=False))
  for prompt, text in zip(prompts, texts):
    tokens = [tok.bos_id] + tok.encode(prompt)   # BOS at position 0, no padding: the reference
    generated = []
    for _ in range(new):
      logits = full(jnp.array([tokens + [tok.pad_id] * (32 - len(tokens))]))
      nxt = int(jnp.argmax(logits[0, len(tokens) - 1]))
      if nxt == tok.eos_id:
        break
      tokens.append(nxt)
      generated.append(nxt)
    assert text == tok.decode(generated), (prompt, text, tok.decode(generated))
