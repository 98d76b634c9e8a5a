"""Bad input, for every family: each mistake a user makes is one UserError that names the field (and,
for a choice, the choices), raised before anything is written, so the work directory stays absent.

The table runs in-process against the real driver (`loop.train_and_evaluate`), with training itself
replaced by a failure, so a mistake that slips through the checks fails here at once. A few cases go
through the real command line for the format: one `error:` line, the exit status, no traceback.
"""
import os
import re
import textwrap

import pytest

from helpers import preset, run_cli
from model_zoo import config as config_lib
from model_zoo.data.registry import IMAGE_CLASSIFICATION
from model_zoo.errors import UserError
from model_zoo.training import loop

FAMILIES = ['mlp', 'cnn', 'resnet', 'vit', 'mixer', 'lstm', 'gpt', 'transformer', 'bert_pretrain', 'bert_finetune',
            'autoencoder', 'vae', 'gan']

# (dotted key, bad value, what the message must contain). A row applies to each family whose config has the key.
CHOICES = [
    ('model.name', 'mixr', ['config.model.name', 'mlp', 'gpt']),
    ('model.positional', 'rotery', ['config.model.positional', "'learned'", "'sinusoidal'"]),
    ('model.activation', 'gleu', ['config.model.activation', "'gelu'", "'relu'", "'swiglu'"]),
    ('model.dtype', 'bf16', ['config.model.dtype', "'bfloat16'", "'float32'"]),
    ('model.attention_impl', 'foo', ['config.model.attention_impl', "'cudnn'", "'xla'"]),
    ('model.pooling', 'max', ['config.model.pooling', "'cls'", "'mean'"]),
    ('model.pool', 'max', ['config.model.pool', "'cls'", "'mean'"]),
    ('model.cell', 'lsmt', ['config.model.cell', "'lstm'", "'gru'"]),
    ('model.block', 'basc', ['config.model.block', "'basic'", "'bottleneck'"]),
    ('model.stem', 'cifr', ['config.model.stem', "'cifar'", "'imagenet'"]),
    ('optimizer.schedule', 'cosine', ['config.optimizer.schedule', 'warmup_cosine', 'rsqrt']),
    ('optimizer.name', 'adamx', ['config.optimizer.name', 'adamw', 'sgd']),
    ('discriminator_optimizer.name', 'adamx', ['config.discriminator_optimizer.name', 'adam']),
    ('task', 'clasification', ['config.task', 'classification']),
    ('dataset.name', 'digts', ['config.dataset.name', 'digits']),
    ('dataset.tokenizer', 'sentencepeice', ['config.dataset.tokenizer', 'sentencepiece']),
    ('dataset.augment', 'crp', ['config.dataset.augment', 'crop_flip']),
    ('likelihood', 'bernouli', ['config.likelihood', 'bernoulli', 'gaussian']),
    ('decode.bleu_tokenize', '13x', ['config.decode.bleu_tokenize', '13a', 'intl']),
    ('freeze', 'all', ['config.freeze', "'backbone'"]),
]
RANGES = [
    ('batch_size', 36, ['config.batch_size=36', 'does not divide over 8']),
    ('grad_accum_steps', 3, ['config.grad_accum_steps=3']),
    ('mesh.data', 3, ['config.mesh', 'needs 3 devices']),
    ('mesh.tensor', 16, ['config.mesh', 'does not divide 8 devices']),
    ('num_train_steps', 0, ['config.num_train_steps']),
    ('seed', -1, ['config.seed']),
    ('optimizer.learning_rate', -1.0, ['config.optimizer.learning_rate']),
    ('optimizer.b2', 1.0, ['config.optimizer.b2']),
    ('optimizer.layer_decay', 1.5, ['config.optimizer.layer_decay']),
    ('model.dropout_rate', 1.5, ['config.model.dropout_rate', '[0, 1)']),
    ('model.num_layers', 0, ['config.model.num_layers', '>= 1']),
    ('model.num_encoder_layers', 0, ['config.model.num_encoder_layers', '>= 1']),
    ('model.d_model', -4, ['config.model.d_model', '>= 1']),
    ('model.num_heads', 3, ['config.model.num_heads=3', 'must divide config.model.d_model']),
    ('model.num_kv_heads', 3, ['config.model.num_kv_heads=3', 'must divide config.model.num_heads']),
    ('model.d_ff', 0, ['config.model.d_ff', '>= 1']),
    ('model.attention_impl', 'cudnn', ["config.model.attention_impl='cudnn'"]),   # a CPU, or float32 on a GPU
    ('model.max_len', 0, ['config.model.max_len', '>= 1']),
    ('model.lora_rank', -1, ['config.model.lora_rank', '>= 0']),
    ('model.ln_epsilon', 0.0, ['config.model.ln_epsilon']),
    ('model.hidden_sizes', (0,), ['config.model.hidden_sizes', '>= 1']),
    ('model.features', (0,), ['config.model.features', '>= 1']),
    ('model.stage_sizes', (2, 0), ['config.model.stage_sizes', '>= 1']),
    ('model.bn_momentum', 1.5, ['config.model.bn_momentum']),
    ('model.width', 0, ['config.model.width', '>= 1']),
    ('model.patch_size', 0, ['config.model.patch_size', '>= 1']),
    ('model.hidden_size', 0, ['config.model.hidden_size', '>= 1']),
    ('model.latent_dim', 0, ['config.model.latent_dim', '>= 1']),
    ('model.token_mlp_dim', 0, ['config.model.token_mlp_dim', '>= 1']),
    ('dataset.seq_len', 0, ['config.dataset.seq_len']),
    ('dataset.mlm_probability', 1.5, ['config.dataset.mlm_probability']),
    ('decode.beam_size', 0, ['config.decode', 'beam_size']),
    ('label_smoothing', 1.0, ['config.label_smoothing']),
    ('loss_chunks', 3, ['config.loss_chunks=3', 'divides config.dataset.seq_len']),
    ('decoder_std', 0.0, ['config.decoder_std']),
]
# Options that exist but do not apply to the family.
DOES_NOT_APPLY = [
    ('dataset.classes', '6,7', ['config.dataset.classes', 'image classification']),
    ('model.positional', 'rotary', ['config.model.positional', 'is not an option of model']),
    ('model.lora_rank', 4, ['config.model.lora_rank', 'is not an option of model']),
    ('freeze', 'backbone', ['config.freeze', 'config.init_from']),
    ('init_from', '/nonexistent/run', ['config.init_from', '/nonexistent/run']),
    ('grad_accum_steps', 2, ['config.grad_accum_steps=2', 'does not apply to the GAN']),
    ('per_device_batch_size', 4, ['config.per_device_batch_size=4', 'does not apply to the GAN']),
    ('loss_chunks', 4, ['config.loss_chunks=4', 'applies to language models']),
]


def _has(config, key):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
  return True


def _set(config, key, value):
  *path, leaf = key.split('.')
  node = config
  for part in path:
    node = node[part]
  with node.unlocked(), node.ignore_type():
    node[leaf] = value


def _cases():
  configs = {name: preset(name) for name in FAMILIES}
  cases = []
  for name, config in configs.items():
    for key, value, words in CHOICES + RANGES:
      if _has(config, key) and (key != 'loss_chunks' or name == 'gpt'):   # GPT: the LM with an output layer apart
        cases.append(pytest.param(name, key, value, words, id=f'{name}-{key}={value}'))
    for key, value, words in DOES_NOT_APPLY:
      applies = _has(config, key) and not (key == 'dataset.classes' and config.dataset.name in IMAGE_CLASSIFICATION)
      if key.startswith('model.'):
        applies = not _has(config, key)   # an option of another family
      if key in ('grad_accum_steps', 'per_device_batch_size'):
        applies = config.task == 'gan'
      if key == 'loss_chunks':
        applies = config.task != 'language_modeling'
      if applies:
        cases.append(pytest.param(name, key, value, words, id=f'{name}-{key}={value}-does-not-apply'))
  return cases


CASES = _cases()


def test_the_table_covers_every_family_and_many_mistakes():
  families = {c.values[0] for c in CASES}
  assert families == set(FAMILIES)
  assert len(CASES) >= 300, len(CASES)
  for name in FAMILIES:  # every family gets its own choices and ranges, not only the shared keys
    assert sum(c.values[0] == name and c.values[1].startswith('model.') for c in CASES) >= 3, name


@pytest.mark.parametrize('name, key, value, words', CASES)
def test_a_mistake_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch, name, key, value, words):
  config = preset(name)
  _set(config, key, value)
  monkeypatch.setattr(loop, '_train', lambda run: pytest.fail(f'{key}={value!r} reached training'))
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert '\n' not in message
  for word in words:
    assert word in message, message
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('args, message', [
    (['--config=configs/gpt.py', '--config.model.positional=rotery'],
     "config.model.positional='rotery' is not one of 'learned', 'sinusoidal', 'rotary'"),
    (['--config=configs/transformer.py', '--config.model.num_heads=3'], 'config.model.num_heads=3 must divide'),
    (['--config=configs/resnet.py', '--config.optimizer.schedule=cosin'], "unknown schedule 'cosin'"),
])
def test_the_command_line_prints_one_line(tmp_path, args, message):
  workdir = tmp_path / 'run'
  proc = run_cli('train.py', *args, f'--workdir={workdir}', devices=8)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith('error: '), proc.stderr
  assert message in proc.stderr and 'Traceback' not in proc.stdout + proc.stderr
  assert not workdir.exists()


def _config_file(tmp_path, text):
  path = tmp_path / 'my_config.py'
  path.write_text(textwrap.dedent(text))
  return str(path)


@pytest.mark.parametrize('text, message', [
    ('def get_config(:\n  pass\n', r'my_config.py line 1: syntax error'),
    ('x = 1\n', r'my_config.py has no get_config\(\)'),
    ('def get_config():\n  return {}["model"]\n', r"my_config.py: 'model'"),
    ('def get_config():\n  raise RuntimeError("no GPU here")\n', r'get_config\(\) failed: RuntimeError: no GPU here'),
    ('def get_config():\n  return {"a": 1}\n', r'get_config\(\) returned a dict, not an ml_collections.ConfigDict'),
    ('import not_a_module\n', r'my_config.py could not be imported: .*not_a_module'),
])
def test_config_files_that_cannot_be_used(tmp_path, text, message):
  with pytest.raises(UserError, match=message):
    config_lib.load(_config_file(tmp_path, text))


def test_command_line_mistakes(tmp_path):
  """No --config, an extra argument, a config that fails, and workdirs that cannot be: one line each."""
  broken = _config_file(tmp_path, 'def get_config():\n  raise ValueError("line one\\nline two")\n')
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  cases = [
      (['--workdir=/tmp/x'], 2, '--config is required'),
      (['--config=configs/mlp.py', 'extra'], 2, 'unexpected arguments: extra'),
      ([f'--config={broken}'], 2, 'line one line two'),                      # folded into one line
      (['--config=configs/mlp.py', f'--workdir={a_file}'], 1, 'is a file, not a directory'),
      (['--config=configs/mlp.py', f'--workdir={a_file}/run'], 1, f'lies under {a_file}, which is a file'),
      (['--config=configs/mlp.py', '--workdir=/proc/model_zoo_run'], 1, 'cannot be written'),
  ]
  for args, code, message in cases:
    proc = run_cli('train.py', *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith('error: '), (args, proc.stderr)
    assert re.search(re.escape(message), lines[0]), (args, lines[0])
  assert a_file.read_text() == 'x'
