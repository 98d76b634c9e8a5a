"""model_zoo.transfer.hf: Hugging Face BERT / GPT-2 checkpoints onto our models, and back.

Small random checkpoints are made with `transformers` (no downloads). Every weight, LayerNorm
included, is set to random values of a useful size before saving, so that a mapping mistake (a
transposed or swapped kernel, swapped LayerNorms, the wrong GELU) changes the logits visibly.
"""
import json
import os
import pickle
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the test extra installs torch and transformers: these tests must run, not skip
import transformers

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors.numpy  # pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors.torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from model_zoo.errors import UserError  # pylint: disable=wrong-import-position
from model_zoo.models.bert import BERT  # pylint: disable=wrong-import-position
from model_zoo.models.gpt import GPT  # pylint: disable=wrong-import-position
from model_zoo.data import tokenizers  # pylint: disable=wrong-import-position
from model_zoo.transfer import hf  # pylint: disable=wrong-import-position

TOL = 1e-4
BERT_SIZES = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, type_vocab_size=2)
GPT_SIZES = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)

# Three rows of 10 tokens: row 1 ends in 4 padding tokens; row 2 mixes sentence A and B.
MASK = np.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 10], np.int64)
TYPES = np.array([[0] * 10, [0] * 10, [0] * 5 + [1] * 5], np.int64)


def _tokens(vocab_size, seed=0):
  return np.random.default_rng(seed).integers(1, vocab_size, MASK.shape) * MASK


def _randomize(model, seed=0):
  """Every 1-D parameter (biases, LayerNorms) ~ (1 if a weight else 0) + N(0, 0.5); matrices ~ N(0, 0.3)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if p.ndim == 1 and name.endswith('weight') else 0.0
      p.copy_(base + (0.5 if p.ndim == 1 else 0.3) * torch.randn(p.shape, generator=gen))
  return model.eval()


def _ours(cfg, cls, **kwargs):
  return cls(**{k: v for k, v in cfg.items() if k != 'name'}, dropout_rate=0.0, **kwargs)


def _check_tree(model, tokens, params, heads_left_out=()):
  """load_params gives exactly the tree (names and shapes) that model.init makes, less `heads_left_out`."""
  want = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(tokens), train=False)))['params']
  want = {k: v for k, v in want.items() if k not in heads_left_out}
  assert jax.tree.map(lambda s: s.shape, want) == jax.tree.map(np.shape, params)


def _max_diff(ours, theirs, mask):
  return float(np.abs(np.asarray(ours) - np.asarray(theirs))[mask.astype(bool)].max())


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomize(transformers.BertForMaskedLM(transformers.BertConfig(**BERT_SIZES)))
  directory = str(tmp_path_factory.mktemp('bert'))
  model.save_pretrained(directory)
  return directory, model


@pytest.fixture(scope='module')
def gpt_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT_SIZES)), seed=1)
  directory = str(tmp_path_factory.mktemp('gpt2'))
  model.save_pretrained(directory, max_shard_size='20KB')  # sharded: model.safetensors.index.json
  return directory, model


def test_bert_mlm_logits_match(bert_dir):
  directory, theirs = bert_dir
  cfg = hf.model_config(directory)
  assert cfg == dict(name='bert', num_layers=2, d_model=32, num_heads=4, d_ff=37, max_len=64, type_vocab_size=2,
                     activation='gelu_exact', ln_epsilon=1e-12, vocab_size=101)
  params = hf.load_params(directory, 'bert')
  model = _ours(cfg, BERT, head='mlm')
  tokens = _tokens(cfg['vocab_size'])
  _check_tree(model, tokens, params)
  ours = model.apply({'params': params}, jnp.asarray(tokens), train=False, type_ids_BxT=jnp.asarray(TYPES),
                     segment_ids_BxT=jnp.asarray(MASK))
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK),
                  token_type_ids=torch.tensor(TYPES)).logits.numpy()
  diff = _max_diff(ours, want, MASK)
  print(f'\nBERT (masked LM) max abs logit difference vs transformers: {diff:.2e} '
        f'(logits up to {np.abs(want).max():.1f})')
  assert diff <= TOL


def test_gpt2_logits_match(gpt_dir):
  directory, theirs = gpt_dir
  assert os.path.exists(os.path.join(directory, 'model.safetensors.index.json'))
  cfg = hf.model_config(directory)
  assert cfg == dict(name='gpt', num_layers=2, d_model=32, num_heads=4, d_ff=128, max_len=64, positional='learned',
                     pre_ln=True, tie_embeddings=True, attention_bias=True, activation='gelu', ln_epsilon=1e-5,
                     vocab_size=99)
  params = hf.load_params(directory, 'gpt')
  model = _ours(cfg, GPT)
  tokens = _tokens(cfg['vocab_size'], seed=1)
  _check_tree(model, tokens, params)
  ours = model.apply({'params': params}, jnp.asarray(tokens), train=False, segment_ids_BxT=jnp.asarray(MASK))
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK)).logits.numpy()
  diff = _max_diff(ours, want, MASK)
  print(f'\nGPT-2 max abs logit difference vs transformers: {diff:.2e} (logits up to {np.abs(want).max():.1f})')
  assert diff <= TOL * max(1.0, float(np.abs(want).max()) / 4)   # float32 sums: 1.4e-4 seen at logits of 7.2


def test_bert_pytorch_bin_old_names_and_pooler(tmp_path):
  """pytorch_model.bin, unprefixed BertModel keys with old LayerNorm.gamma/beta names: the pooler
  lands in cls_head/pooler (compared through the classify head with an identity output layer)
  and the final hidden states match (through the tokens head with an identity output layer)."""
  torch.manual_seed(0)
  theirs = _randomize(transformers.BertModel(transformers.BertConfig(**BERT_SIZES)), seed=2)
  old = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
         for k, v in theirs.state_dict().items()}
  assert 'embeddings.LayerNorm.gamma' in old and not any(k.startswith('bert.') for k in old)
  torch.save(old, tmp_path / 'pytorch_model.bin')  # transformers 5 always writes safetensors
  theirs.config.save_pretrained(str(tmp_path))
  cfg = hf.model_config(str(tmp_path))
  params = hf.load_params(str(tmp_path), 'bert')
  assert 'mlm_head' not in params and set(params['cls_head']) == {'pooler'}
  tokens, d = _tokens(cfg['vocab_size'], seed=2), cfg['d_model']
  identity = {'kernel': np.eye(d, dtype=np.float32), 'bias': np.zeros(d, np.float32)}
  kwargs = dict(train=False, type_ids_BxT=jnp.asarray(TYPES), segment_ids_BxT=jnp.asarray(MASK))
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK), token_type_ids=torch.tensor(TYPES))
  pooled = _ours(cfg, BERT, head='classify', num_classes=d).apply(
      {'params': {**params, 'cls_head': {**params['cls_head'], 'out': identity}}}, jnp.asarray(tokens), **kwargs)
  hidden = _ours(cfg, BERT, head='tokens', num_classes=d).apply(
      {'params': {**{k: v for k, v in params.items() if k != 'cls_head'}, 'token_head': identity}},
      jnp.asarray(tokens), **kwargs)
  assert _max_diff(pooled, want.pooler_output.numpy(), np.ones(len(tokens))) <= TOL
  assert _max_diff(hidden, want.last_hidden_state.numpy(), MASK) <= TOL


def test_gpt2_bfloat16_unprefixed_extra_keys(gpt_dir, tmp_path):
  """A bfloat16 file (numpy has no bfloat16) with keys lacking 'transformer.', plus lm_head.weight."""
  directory, theirs = gpt_dir
  state = {k.removeprefix('transformer.'): v.to(torch.bfloat16).contiguous() for k, v in theirs.state_dict().items()}
  state['lm_head.weight'] = state['wte.weight'].clone()
  safetensors.torch.save_file(state, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  theirs.config.save_pretrained(str(tmp_path))
  full, half = hf.load_params(directory, 'gpt'), hf.load_params(str(tmp_path), 'gpt')
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(half)):
    assert b.dtype == np.float32 and np.abs(a - b).max() <= 0.01 * np.abs(a).max()


def _bert_vocab():
  words = ['hello', 'world', 'the', 'cat', 'dog', 'are', 'run', 'is']
  letters = [chr(c) for c in range(ord('a'), ord('z') + 1)]
  return (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words + ['##ning', '##ing'] + letters
          + [f'##{c}' for c in letters] + list('.,!?:\''))


TEXTS = ['Hello World, the cats are running!', 'UNSEEN words: café, naïve... 😀', 'a', '', 'dogs [MASK] is']


def _check_tokenizer(ours, theirs, special):
  for text in TEXTS:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)['input_ids'], text
  assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
  ids = [special[0]] + ours.encode(TEXTS[0]) + [special[1], special[2]]
  assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  assert ours.decode(np.asarray(ids)) == ours.decode(ids)
  again = pickle.loads(pickle.dumps(ours))
  assert again.encode(TEXTS[1]) == ours.encode(TEXTS[1]) and again.vocab_size == ours.vocab_size


def test_bert_tokenizer(tmp_path):
  (tmp_path / 'vocab.txt').write_text('\n'.join(_bert_vocab()) + '\n', encoding='utf-8')
  theirs = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
  ours = tokenizers.HFTokenizer(str(tmp_path))   # from vocab.txt
  assert (ours.pad_id, ours.unk_id, ours.bos_id, ours.eos_id, ours.mask_id) == (0, 1, 2, 3, 4)
  assert ours.vocab_size == len(_bert_vocab()) == theirs.vocab_size
  assert ours.encode('Hello cats') == [5, 8, 59]  # hello, cat, ##s
  _check_tokenizer(ours, theirs, (ours.bos_id, ours.eos_id, ours.pad_id))
  fast = tmp_path / 'fast'
  theirs.save_pretrained(str(fast))
  assert (fast / 'tokenizer.json').exists()
  ours = tokenizers.HFTokenizer(str(fast))     # from tokenizer.json
  assert (ours.pad_id, ours.unk_id, ours.bos_id, ours.eos_id, ours.mask_id) == (0, 1, 2, 3, 4)
  _check_tokenizer(ours, theirs, (ours.bos_id, ours.eos_id, ours.pad_id))


def test_gpt2_tokenizer(tmp_path):
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(TEXTS * 3 + ['the quick brown fox jumps over the lazy dog'] * 3, vocab_size=300,
                          min_frequency=1, special_tokens=['<|endoftext|>'], show_progress=False)
  bpe.save_model(str(tmp_path))       # vocab.json + merges.txt
  theirs = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
  for directory in (tmp_path, tmp_path / 'fast'):
    if directory != tmp_path:
      theirs.save_pretrained(str(directory))
      assert (directory / 'tokenizer.json').exists()
    ours = tokenizers.HFTokenizer(str(directory))
    end = ours.encode('<|endoftext|>')
    assert end == [0] and (ours.pad_id, ours.bos_id, ours.eos_id, ours.unk_id, ours.mask_id) == (0, 0, 0, 0, None)
    assert ours.vocab_size == theirs.vocab_size
    _check_tokenizer(ours, theirs, (0, 0, 0))
    assert all(ours.decode(ours.encode(t)) == t for t in TEXTS)


def _write_config(directory, **fields):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(fields, f)


def test_errors(bert_dir, tmp_path, monkeypatch):
  directory, theirs = bert_dir
  with pytest.raises(UserError, match='config.json not found'):
    hf.model_config(str(tmp_path))
  (tmp_path / 'bad' ).mkdir()
  (tmp_path / 'bad' / 'config.json').write_text('{not json')
  with pytest.raises(UserError, match='could not read'):
    hf.model_config(str(tmp_path / 'bad'))
  _write_config(tmp_path / 'llama', model_type='llama', hidden_size=32)
  with pytest.raises(UserError, match="model_type 'llama'; supported: .*BERT.*GPT-2"):
    hf.model_config(str(tmp_path / 'llama'))
  config = theirs.config.to_dict()
  _write_config(tmp_path / 'silu', **{**config, 'hidden_act': 'silu'})
  with pytest.raises(UserError, match="activation 'silu'"):
    hf.model_config(str(tmp_path / 'silu'))
  _write_config(tmp_path / 'noweights', **config)
  with pytest.raises(UserError, match='no weights'):
    hf.load_params(str(tmp_path / 'noweights'), 'bert')
  with pytest.raises(UserError, match='not one for model'):
    hf.load_params(directory, 'gpt')
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  _write_config(tmp_path / 'missing', **config)
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if 'layer.1.output.dense.weight' not in k},
                              str(tmp_path / 'missing' / 'model.safetensors'))
  with pytest.raises(UserError, match=r"lacks 'encoder\.layer\.1\.output\.dense\.weight'"):
    hf.load_params(str(tmp_path / 'missing'), 'bert')
  _write_config(tmp_path / 'shape', **{**config, 'vocab_size': config['vocab_size'] + 1})
  safetensors.numpy.save_file(tensors, str(tmp_path / 'shape' / 'model.safetensors'))
  with pytest.raises(UserError, match=r"'embeddings\.word_embeddings\.weight' has shape \(101, 32\)"):
    hf.load_params(str(tmp_path / 'shape'), 'bert')
  _write_config(tmp_path / 'torch', **config)
  (tmp_path / 'torch' / 'pytorch_model.bin').write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(UserError, match='pip install torch'):
    hf.load_params(str(tmp_path / 'torch'), 'bert')
  with pytest.raises(UserError, match='no tokenizer'):
    tokenizers.HFTokenizer(str(tmp_path))


def _perturb(params, seed):
  """Our initial parameters with every leaf random: LayerNorm scales near 1, the rest ~ N(0, 0.3)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat:
    keys = tuple(p.key for p in path)
    out[keys] = ((1.0 if keys[-1] == 'scale' else 0.0) + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize('name', ['bert', 'gpt'])
def test_save_round_trip(name, tmp_path):
  if name == 'bert':
    cfg = dict(name='bert', num_layers=2, d_model=32, num_heads=4, d_ff=37, max_len=64)
    model, theirs_cls, vocab = _ours(cfg, BERT, vocab_size=101, head='mlm'), transformers.BertForMaskedLM, 101
  else:
    cfg = dict(name='gpt', num_layers=2, d_model=32, num_heads=4, d_ff=48, max_len=64, attention_bias=True)
    model, theirs_cls, vocab = _ours(cfg, GPT, vocab_size=99), transformers.GPT2LMHeadModel, 99
  tokens = _tokens(vocab, seed=3)
  params = _perturb(nn.unbox(model.init(jax.random.key(0), jnp.asarray(tokens), train=False))['params'], seed=3)
  hf.save(str(tmp_path), params, cfg)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, hf.load_params(str(tmp_path), name), params)))
  theirs, info = theirs_cls.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  kwargs = dict(type_ids_BxT=jnp.asarray(TYPES)) if name == 'bert' else {}
  ours = model.apply({'params': params}, jnp.asarray(tokens), train=False, segment_ids_BxT=jnp.asarray(MASK),
                     **kwargs)
  with torch.no_grad():
    extra = dict(token_type_ids=torch.tensor(TYPES)) if name == 'bert' else {}
    want = theirs.eval()(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK), **extra).logits.numpy()
  diff = _max_diff(ours, want, MASK)
  print(f'\n{name} saved -> transformers: max abs logit difference {diff:.2e}')
  assert diff <= TOL


def test_a_gpt_of_another_layout_is_refused_in_one_line(tmp_path):
  """The GPT default (rotary positions, no biases) has no GPT-2 equivalent: one UserError, which export
  reports while still writing its own files."""
  cfg = dict(name='gpt', num_layers=1, d_model=32, num_heads=4, d_ff=48, max_len=64, positional='rotary')
  model = _ours(cfg, GPT, vocab_size=99)
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(_tokens(99, seed=1)), train=False))['params']
  with pytest.raises(UserError, match="only a GPT-2 layout .* this model has {'positional': 'rotary'"):
    hf.save(str(tmp_path), params, cfg)


# The command line: fine-tuning from a Hugging Face directory, with its tokenizer.

def test_train_bert_classifier_from_hf_directory(bert_dir, tmp_path):
  from helpers import run_cli  # pylint: disable=g-import-not-at-top
  directory = tmp_path / 'bert'
  shutil.copytree(bert_dir[0], directory)
  (directory / 'vocab.txt').write_text('\n'.join(_bert_vocab()) + '\n', encoding='utf-8')
  workdir = str(tmp_path / 'run')
  args = ['--config=configs/bert_finetune.py', f'--workdir={workdir}', f'--config.init_from=hf:{directory}',
          '--config.dataset.seq_len=48', '--config.batch_size=8']
  proc = run_cli('train.py', *args, '--config.freeze=backbone', '--config.num_train_steps=3',
                 '--config.log_every_steps=1', '--config.optimizer.warmup_steps=1', check=True)
  assert 'arrays restored; new: cls_head' in proc.stdout
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model']['d_model'] == 32 and saved['dataset']['tokenizer'] == f'hf:{directory}'
  from model_zoo.training.checkpoints import Checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  trained = ckpt.restore_tree(3)['params']
  ckpt.close()
  imported = hf.load_params(str(directory), 'bert')
  flat = lambda t: {'/'.join(str(getattr(k, 'key', k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  trained, imported = flat(trained), flat(imported)
  backbone = [k for k in trained if not k.startswith('cls_head')]
  assert backbone and all(np.array_equal(trained[k], imported[k]) for k in backbone)  # frozen: still HF's
  run_cli('eval.py', *args, check=True)
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert 'f1_macro' in json.load(f)


def test_train_gpt2_language_model_from_hf_directory(tmp_path):
  from helpers import run_cli  # pylint: disable=g-import-not-at-top
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  directory = tmp_path / 'gpt2'
  directory.mkdir()
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator([topics['if'], topics['while']], vocab_size=320, min_frequency=2,
                          special_tokens=['<|endoftext|>'], show_progress=False)
  bpe.save_model(str(directory))
  vocab = bpe.get_vocab_size()
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT_SIZES, 'vocab_size': vocab})).save_pretrained(directory)
  workdir = str(tmp_path / 'run')
  proc = run_cli('train.py', '--config=configs/gpt.py', f'--workdir={workdir}', f'--config.init_from=hf:{directory}',
                 '--config.dataset.seq_len=32', '--config.batch_size=8', '--config.num_train_steps=2',
                 '--config.log_every_steps=1', '--config.eval_every_steps=2', '--config.optimizer.warmup_steps=1',
                 check=True)
  assert 'arrays restored; new: no head' in proc.stdout
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [m for m in map(json.loads, f) if m['split'] == 'eval']
  assert evals and np.isfinite(evals[-1]['bits_per_byte'])
