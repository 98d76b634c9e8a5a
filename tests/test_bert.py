"""BERT: masked-LM data, the pydoc_topics task, fine-tuning (init_from, freeze, layer decay) and LoRA.

The encoder itself is checked against Hugging Face's implementation in test_hf_import.py.
"""
import collections
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import read_metrics, tiny_config
from model_zoo.data import text_classification as tc
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.models.bert import BERT
from model_zoo.transfer.finetune import trains_when_frozen as is_head
from model_zoo.training import loop, optimizers
from model_zoo.transfer import export, finetune

SMALL = {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
         'dataset.vocab_size': 600, 'dataset.seq_len': 48, 'batch_size': 16, 'log_every_steps': 5,
         'optimizer.warmup_steps': 2}


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(workdir, step):
  from model_zoo.training.checkpoints import Checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    return _flat(ckpt.restore_tree(step)['params'])
  finally:
    ckpt.close()


# Data.

def test_pydoc_topics_passages_are_split_once_and_test_is_unseen():
  passages, classes = tc.pydoc_passages()
  assert len(classes) >= 15
  by_split = collections.defaultdict(set)
  for p in passages:
    by_split[p.split].add(p.text)
    assert len(p.text.split()) == tc.PASSAGE_WORDS
  assert not by_split['test'] & by_split['train'] and not by_split['validation'] & by_split['train']
  # No paragraph is shared between topics: a passage's words appear under one topic only.
  topics_of = collections.defaultdict(set)
  for p in passages:
    topics_of[p.text].add(p.topic)
  assert all(len(t) == 1 for t in topics_of.values())
  counts = collections.Counter(p.split for p in passages if p.topic in classes)
  assert counts['test'] > 150 and counts['train'] > 4 * counts['test'] // 2


class _Tok:
  pad_id, bos_id, eos_id, mask_id, vocab_size = 0, 1, 2, 4, 100


def _row(n_real=50, seq_len=64, seed=0):
  ids = np.random.default_rng(seed).integers(5, 100, n_real - 2)
  return tc.encode(ids, seq_len, _Tok)


def _mask(example, rng):
  return tc.mask_tokens(example, rng, probability=0.15, mask_id=4, vocab_size=100, special_ids=(0, 1, 2, 4),
                        first_random_id=5)


def test_masking_follows_bert_rule():
  example = _row()
  chosen_total, actions = 0, collections.Counter()
  for seed in range(400):
    out = _mask(example, np.random.default_rng(seed))
    w = out['weights'].astype(bool)
    # round(0.15 * 48 real non-special tokens) = 7, never [CLS], [SEP] or padding.
    assert w.sum() == 7 and not w[0] and not w[49] and not w[50:].any()
    np.testing.assert_array_equal(out['targets'], example['inputs'])
    np.testing.assert_array_equal(out['inputs'][~w], example['inputs'][~w])
    assert out['mlm_positions'].shape == (10,) and out['mlm_weights'].sum() == 7  # ceil(0.15 * 64) = 10
    np.testing.assert_array_equal(out['mlm_positions'][:7], np.flatnonzero(w))
    chosen_total += w.sum()
    masked = out['inputs'][w] == 4
    kept = out['inputs'][w] == example['inputs'][w]
    actions.update(mask=masked.sum(), keep=(kept & ~masked).sum(), random=(~kept & ~masked).sum())
  share = {k: v / chosen_total for k, v in actions.items()}
  # 80/10/10 (a random token may equal the original: 1 in 95 of the 10%)
  assert abs(share['mask'] - 0.8) < 0.03 and abs(share['keep'] - 0.1 - 0.1 / 95) < 0.02, share
  assert abs(share['random'] - 0.1) < 0.02, share


def test_masking_is_deterministic_from_the_seed():
  a = _mask(_row(), np.random.default_rng([3, 7]))
  b = _mask(_row(), np.random.default_rng([3, 7]))
  c = _mask(_row(), np.random.default_rng([3, 8]))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a['weights'], c['weights'])


def test_mlm_loss_counts_masked_positions_only():
  from model_zoo.tasks.masked_lm import MaskedLMTask  # pylint: disable=g-import-not-at-top
  config = tiny_config('bert_pretrain', **{'model.num_layers': 1, 'model.d_model': 16, 'model.num_heads': 2,
                                           'model.d_ff': 32, 'dataset.vocab_size': 100, 'model.dropout_rate': 0.0})
  data = type('D', (), {'tokenizer': _Tok})()
  task = MaskedLMTask(config, data)
  batch = {k: np.stack([_mask(_row(seed=s), np.random.default_rng(s))[k] for s in range(3)])
           for k in ('inputs', 'targets', 'weights', 'segment_ids', 'type_ids', 'mlm_positions', 'mlm_weights')}
  state = task.init_state(jax.random.key(0), batch)
  params = nn.unbox(state.params)
  loss, (metrics, _) = task.loss_fn(params, {}, batch, jax.random.key(1))
  logits = task.model.apply({'params': params}, batch['inputs'], train=False, type_ids_BxT=batch['type_ids'],
                            segment_ids_BxT=batch['segment_ids'])
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  w = batch['weights'].astype(bool)
  want = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0][w].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['accuracy']) == pytest.approx((logits.argmax(-1) == batch['targets'])[w].mean(), abs=1e-6)


# Optimizer options.

def test_layer_decay_scales_updates_by_depth():
  params = {'embed': {'embedding': jnp.ones((3, 2))}, 'block_0': {'w': jnp.ones(2)}, 'block_1': {'w': jnp.ones(2)},
            'cls_head': {'out': jnp.ones(2)}}
  cfg = tiny_config('bert_finetune').optimizer
  cfg.unlock()
  cfg.update(name='sgd', learning_rate=1.0, schedule='constant', warmup_steps=0, layer_decay=0.5, weight_decay=0.0)
  tx = optimizers.build(cfg, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  got = {k: float(next(iter(v.values())).ravel()[0]) for k, v in updates.items()}
  assert got == {'embed': -0.125, 'block_0': -0.25, 'block_1': -0.5, 'cls_head': -1.0}


def test_frozen_parameters_get_no_update_and_the_state_keeps_its_structure():
  params = {'block_0': {'w': jnp.ones((4, 4))}, 'cls_head': {'w': jnp.ones((4, 4))}}
  cfg = tiny_config('bert_finetune', **{'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                                        'optimizer.weight_decay': 0.1}).optimizer
  tx = optimizers.build(cfg, 10, frozen=lambda path: not is_head(path))
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert not np.any(updates['block_0']['w']) and np.all(updates['cls_head']['w'] != 0)
  # eval.py, which does not know how a run was trained, builds the same optimizer-state structure.
  plain = optimizers.build(cfg, 10)
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(state)


# LoRA.

def test_lora_starts_at_the_base_model_and_merges_exactly():
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 50, (2, 12)))
  base = BERT(vocab_size=50, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)
  lora = base.clone(lora_rank=4, lora_alpha=8.0)
  params = nn.unbox(lora.init(jax.random.key(0), tokens, train=False))['params']
  base_params = {k: v for k, v in _flat(params).items() if '_lora_' not in k}
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  unflat = lambda d: traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in d.items()})
  np.testing.assert_allclose(lora.apply({'params': params}, tokens, train=False),
                             base.apply({'params': unflat(base_params)}, tokens, train=False), atol=1e-6)
  # Train-like: give every B a random value, so the adapters change the output; merging keeps it.
  rng = np.random.default_rng(1)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.normal(0, 0.3, v.shape).astype(np.float32) if '_lora_b' in str(p) else v, params)
  with_adapters = lora.apply({'params': trained}, tokens, train=False)
  merged = export.merge_lora(trained, 8.0)
  assert not any('_lora_' in k for k in _flat(merged))
  np.testing.assert_allclose(base.apply({'params': merged}, tokens, train=False), with_adapters, atol=1e-4)
  assert np.abs(np.asarray(with_adapters) - np.asarray(base.apply({'params': unflat(base_params)}, tokens,
                                                                     train=False))).max() > 1e-2


# The whole path, in-process through the drivers train.py and eval.py call (their command lines are tested
# in test_cli.py and test_bad_input.py): pretrain, fine-tune (frozen, LoRA), evaluate, export.

def _config(name='bert_finetune', arg='', **overrides):
  return tiny_config(name, arg, **{**SMALL, **overrides})


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('bert'))
  loop.train_and_evaluate(_config('bert_pretrain', num_train_steps=10, eval_every_steps=10,
                                  checkpoint_every_steps=10), workdir)
  return workdir


def test_pretraining_writes_mlm_metrics(pretrained):
  evals = [m for m in read_metrics(pretrained) if m['split'] == 'eval']
  assert evals and {'loss', 'accuracy', 'perplexity'} <= set(evals[-1])
  assert os.path.exists(os.path.join(pretrained, 'tokenizer.model'))


def _steps(n):
  return {'num_train_steps': n, 'eval_every_steps': n, 'checkpoint_every_steps': n}


def test_frozen_finetuning_trains_only_the_head(pretrained, tmp_path, capsys):
  workdir = str(tmp_path / 'cls')
  config = _config(init_from=pretrained, freeze='backbone', **_steps(8))
  loop.train_and_evaluate(config, workdir)
  assert 'arrays restored; new: cls_head' in capsys.readouterr().out
  before, after = _params(pretrained, 10), _params(workdir, 8)
  backbone = [k for k in after if not k.startswith('cls_head')]
  assert backbone and all(np.array_equal(before[k], after[k]) for k in backbone)
  assert 'cls_head/out/kernel' in after and 'mlm_head/bias' not in after
  # The tokenizer is the pretraining run's, byte for byte.
  with open(os.path.join(pretrained, 'tokenizer.model'), 'rb') as a, open(os.path.join(workdir, 'tokenizer.model'), 'rb') as b:
    assert a.read() == b.read()
  evaluate.evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval.json')) as f:
    result = json.load(f)
  assert {'accuracy', 'f1_macro'} <= set(result)
  assert os.path.exists(os.path.join(workdir, 'confusion_matrix.png'))


def test_unfrozen_finetuning_changes_the_backbone(pretrained, tmp_path):
  workdir = str(tmp_path / 'cls')
  loop.train_and_evaluate(_config(init_from=pretrained, **{'optimizer.layer_decay': 0.8}, **_steps(4)), workdir)
  before, after = _params(pretrained, 10), _params(workdir, 4)
  assert not np.array_equal(before['block_0/mlp/wi/kernel'], after['block_0/mlp/wi/kernel'])


def test_lora_finetuning_and_export(pretrained, tmp_path, capsys):
  workdir, out = str(tmp_path / 'lora'), str(tmp_path / 'export')
  config = _config(init_from=pretrained, freeze='backbone', **{'model.lora_rank': 4}, **_steps(6))
  loop.train_and_evaluate(config, workdir)
  assert 'LoRA arrays' in capsys.readouterr().out
  after = _params(workdir, 6)
  before = _params(pretrained, 10)
  assert all(np.array_equal(before[k], after[k]) for k in after if not is_head(tuple(k.split('/'))))
  assert any(np.abs(after[k]).max() > 0 for k in after if '_lora_b' in k)  # B starts at zero and trained
  evaluate.export(config, workdir, out)
  params, saved = export.load(out)
  assert saved['model']['lora_rank'] == 0 and not any('_lora_' in k for k in _flat(params))
  assert os.path.exists(os.path.join(out, 'tokenizer.model'))


# Bad input: one UserError each, before anything is written.

def test_init_from_a_model_of_another_shape_is_a_clear_error(pretrained, tmp_path):
  workdir = str(tmp_path / 'cls')
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(_config(init_from=pretrained, **{'model.d_ff': 48}), workdir)
  assert 'does not hold this model\'s backbone' in str(e.value) and 'shape of block_0/mlp/wi' in str(e.value)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


@pytest.mark.parametrize('overrides, message', [
    ({'freeze': 'backbone'}, 'set config.init_from'),
    ({'freeze': 'all'}, "config.freeze must be 'none' or 'backbone'"),
    ({'optimizer.layer_decay': 1.5}, 'layer_decay must be in (0, 1]'),
    ({'init_from': '/nonexistent'}, 'is not a workdir with checkpoints'),
    ({'init_from': 'hf:/nonexistent'}, 'config.json not found'),
    ({'dataset.name': 'glue/sst2', 'dataset.eval_split': 'validation'}, 'not available offline'),
])
def test_finetuning_bad_input(tmp_path, monkeypatch, overrides, message):
  monkeypatch.setattr(loop, '_train', lambda run: pytest.fail(f'{overrides} reached training'))
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(_config(**overrides), str(tmp_path / 'w'))
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_topic_spans_label_two_passages_of_different_topics():
  from model_zoo.data import registry  # pylint: disable=g-import-not-at-top
  config = tiny_config('bert_finetune', **{'dataset.vocab_size': 600}).dataset
  config.unlock()
  config.name, config.seq_len = 'pydoc_topic_spans', 192
  data = registry.load(config, 'test', None)
  texts = data.source.texts
  for i in range(0, len(texts), 17):
    ex = data.source[i]
    w = ex['weights'].astype(bool)
    labels = ex['labels'][w]
    change = np.flatnonzero(np.diff(labels))
    assert len(change) == 1 and labels[0] != labels[-1]  # two spans, two topics
    assert change[0] + 1 == len(data.tokenizer.encode(texts[i]))  # the boundary is where passage A ends
    assert not w[0] and ex['inputs'][0] == data.tokenizer.bos_id


def test_token_classification_finetuning(pretrained, tmp_path, capsys):
  workdir = str(tmp_path / 'tok')
  config = _config('bert_finetune', 'head=tokens', init_from=pretrained, **{'dataset.seq_len': 96}, **_steps(4))
  loop.train_and_evaluate(config, workdir)
  assert 'new: token_head' in capsys.readouterr().out
  evaluate.evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert {'accuracy', 'f1_macro'} <= set(json.load(f))


def test_init_from_takes_heads_it_has_and_refuses_a_freeze_that_trains_nothing(monkeypatch):
  model = BERT(vocab_size=50, num_layers=1, d_model=8, num_heads=2, d_ff=16, head='classify', num_classes=3)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens, train=False))['params']
  source = jax.tree.map(lambda x: np.full(x.shape, 7.0, np.float32), params)
  del source['cls_head']['out']          # a pretrained model's pooler (as Hugging Face BERT has), no classifier
  monkeypatch.setattr(finetune, '_source_variables', lambda init_from, name: finetune.HostArrays({'params': source}))
  config = tiny_config('bert_finetune', init_from='hf:x', freeze='backbone')
  got = _flat(finetune.initial_variables(config, {'params': params})['params'])
  assert np.all(got['cls_head/pooler/kernel'] == 7.0) and np.all(got['block_0/mlp/wi/kernel'] == 7.0)
  np.testing.assert_array_equal(got['cls_head/out/kernel'], _flat(params)['cls_head/out/kernel'])
  source['cls_head']['out'] = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params['cls_head']['out'])
  with pytest.raises(UserError, match='would train nothing'):
    finetune.initial_variables(config, {'params': params})


@pytest.mark.parametrize('size, hf_count', [('base', 109_482_240), ('large', 335_141_888)])
def test_bert_sizes_have_the_papers_parameter_counts(size, hf_count):
  """Hugging Face's bert-{base,large}-uncased BertModel (with pooler), plus our 2-class output layer."""
  from configs.bert_pretrain import SIZES  # pylint: disable=g-import-not-at-top
  num_layers, d_model, num_heads, d_ff = SIZES[size]
  model = BERT(vocab_size=30522, num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_ff=d_ff,
               head='classify', num_classes=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), train=False))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes['params']))) == hf_count + d_model * 2 + 2
