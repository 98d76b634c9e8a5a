"""Damaged or partial work directories: each case is a message that says what is wrong and what to do;
training resumes from the latest complete checkpoint, says which it skipped, deletes nothing, and ends
exactly where an uninterrupted run does. eval.py, sample, translate and export check config.json."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import family_config, read_metrics, saved_state, tiny_config
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.training import loop
from model_zoo.training.checkpoints import Checkpoints

STEPS = {'num_train_steps': 80, 'checkpoint_every_steps': 20, 'max_checkpoints_to_keep': 5}


def _config():
  return tiny_config('mlp', **STEPS)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 80-step run: checkpoints at 20, 40, 60, 80."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  loop.train_and_evaluate(_config(), workdir)
  return workdir


def _same_run(workdir, reference):
  assert read_metrics(workdir) == read_metrics(reference)
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 80), saved_state(reference, 80))


def _cut(path, keep):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:keep(len(data))])


def _files(directory):
  return sorted(os.path.relpath(os.path.join(r, f), directory) for r, _, fs in os.walk(directory) for f in fs)


DAMAGE = {
    'no state/': lambda w: shutil.rmtree(f'{w}/checkpoints/80/state'),
    'no data/': lambda w: shutil.rmtree(f'{w}/checkpoints/80/data'),
    'no log/': lambda w: shutil.rmtree(f'{w}/checkpoints/80/log'),
    'data/*.json cut short': lambda w: _cut(f'{w}/checkpoints/80/data/process_0-of-1.json', lambda n: n // 2),
    'state/_METADATA cut short': lambda w: _cut(f'{w}/checkpoints/80/state/_METADATA', lambda n: n // 2),
    'an empty step directory': lambda w: shutil.rmtree(f'{w}/checkpoints/80') or os.makedirs(f'{w}/checkpoints/80'),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_last_checkpoint_is_skipped_and_set_aside(tmp_path, reference, damage, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  DAMAGE[damage](workdir)
  kept = _files(os.path.join(workdir, 'checkpoints', '80'))
  evaluate.evaluate(_config(), workdir)  # eval uses the latest complete one, and moves nothing
  out = capsys.readouterr().out
  if damage in ('no data/', 'no log/', 'data/*.json cut short'):
    assert 'eval of step 80' in out     # what eval needs (the state) is whole
  else:
    assert 'skipping the checkpoint at step 80' in out and 'eval of step 60' in out
  assert _files(os.path.join(workdir, 'checkpoints', '80')) == kept

  loop.train_and_evaluate(_config(), workdir)
  out = capsys.readouterr().out
  assert 'skipping the checkpoint at step 80' in out and 'resumed from the checkpoint at step 60' in out
  set_aside = os.path.join(workdir, 'checkpoints-skipped', '80')
  assert f'moved the unusable checkpoint of step 80 to {set_aside}' in out
  assert _files(set_aside) == kept       # nothing deleted
  _same_run(workdir, reference)


def test_a_leftover_orbax_temporary_directory_is_ignored(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  tmp = f'{workdir}/checkpoints/100.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(f'{workdir}/checkpoints/80', tmp)
  shutil.rmtree(f'{tmp}/state')
  ckpt = Checkpoints(f'{workdir}/checkpoints')
  assert ckpt.latest_step(training=True) == 80
  ckpt.close()
  assert evaluate.evaluate(_config(), workdir) == evaluate.evaluate(_config(), reference)
  assert os.path.isdir(tmp)


def test_a_metrics_line_cut_short_is_left_out_and_rewritten(tmp_path, reference, capsys):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  shutil.rmtree(f'{workdir}/checkpoints/80')          # killed after the log line, before the checkpoint
  with open(f'{workdir}/metrics.jsonl', 'a') as f:
    f.write('{"step": 81, "split": "train", "lo')     # and while writing the next line
  evaluate.evaluate(_config(), workdir)             # the plots read it too
  loop.train_and_evaluate(_config(), workdir)
  assert 'left out the last line of' in capsys.readouterr().out
  _same_run(workdir, reference)


def test_a_damaged_metrics_line_in_the_middle_is_an_error(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  lines = open(f'{workdir}/metrics.jsonl').read().splitlines(keepends=True)
  lines[2] = 'garbage\n'
  open(f'{workdir}/metrics.jsonl', 'w').writelines(lines)
  before = _files(workdir)
  with pytest.raises(UserError, match='line 3 of .*metrics.jsonl is damaged'):
    loop.train_and_evaluate(tiny_config('mlp', **{**STEPS, 'num_train_steps': 100}), workdir)
  assert _files(workdir) == before and open(f'{workdir}/metrics.jsonl').read() == ''.join(lines)


def test_a_damaged_config_json_is_an_error_for_train_and_eval(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _cut(f'{workdir}/config.json', lambda n: n - 10)
  before = open(f'{workdir}/config.json', 'rb').read()
  for call in (lambda: loop.train_and_evaluate(_config(), workdir), lambda: evaluate.evaluate(_config(), workdir)):
    with pytest.raises(UserError, match=r'config.json cannot be read \(JSONDecodeError.*Restore it'):
      call()
  assert open(f'{workdir}/config.json', 'rb').read() == before


def test_a_run_started_before_a_shared_key_existed_resumes_with_its_default(tmp_path, reference, capsys):
  """config.json of a run from before `quantization` was added to every config: the run had no quantization."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  with open(f'{workdir}/config.json') as f:
    saved = json.load(f)
  del saved['quantization']
  with open(f'{workdir}/config.json', 'w') as f:
    json.dump(saved, f)
  loop.train_and_evaluate(_config(), workdir)
  assert 'already trained to step 80' in capsys.readouterr().out
  int4 = tiny_config('mlp', **STEPS, **{'quantization.weight_dtype': 'int4'})
  with pytest.raises(UserError, match="holds a run with quantization.weight_dtype='int8', but the config has "
                                      "quantization.weight_dtype='int4'"):
    loop.train_and_evaluate(int4, workdir)


@pytest.mark.parametrize('key, value', [('model.hidden_sizes', (48,)), ('model.dropout_rate', 0.3),
                                        ('dataset.name', 'mnist'), ('seed', 3)])
def test_eval_refuses_a_config_that_would_give_other_numbers(reference, key, value):
  config = tiny_config('mlp', **{**STEPS, key: value})
  for call in (lambda: evaluate.evaluate(config, reference),
               lambda: evaluate.export(config, reference, os.path.join(reference, 'never'))):
    with pytest.raises(UserError, match=f'holds a run with {key}=.* evaluate it with the config it was trained with'):
      call()
  assert not os.path.exists(os.path.join(reference, 'never'))


def test_eval_accepts_what_does_not_change_the_numbers(reference):
  """Batch size, mesh, schedule length and learning rate are how the run was trained or is laid out."""
  base = evaluate.evaluate(_config(), reference)
  other = tiny_config('mlp', **{**STEPS, 'batch_size': 16, 'mesh.data': 4, 'mesh.fsdp': 2, 'num_train_steps': 200,
                                'optimizer.learning_rate': 0.5})
  metrics = evaluate.evaluate(other, reference)
  assert metrics == pytest.approx(base, rel=1e-6)


def test_the_tokenizer_file_damaged(tmp_path):
  config = tiny_config('gpt', **{'num_train_steps': 2, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
                                 'eval_every_steps': 2, 'optimizer.warmup_steps': 1, 'model.num_layers': 1})
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)   # the tokenizer is read before anything else of the workdir
  for content, problem in ((b'', 'the file is empty'), (b'garbage', 'it cannot be parsed')):
    open(f'{workdir}/tokenizer.model', 'wb').write(content)
    for call in (lambda: loop.train_and_evaluate(config, workdir), lambda: evaluate.evaluate(config, workdir)):
      with pytest.raises(UserError, match=f'tokenizer.model is not a usable SentencePiece model: {problem}.*restore'):
        call()
    assert open(f'{workdir}/tokenizer.model', 'rb').read() == content


def test_sample_and_translate_flags_are_checked(tmp_path):
  gpt = family_config('gpt', **{'num_train_steps': 2, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
                                'eval_every_steps': 2, 'optimizer.warmup_steps': 1, 'model.num_layers': 1})
  workdir = str(tmp_path / 'gpt')
  loop.train_and_evaluate(gpt, workdir)
  sample = lambda **kw: evaluate.sample(gpt, workdir, kw.pop('prompts', ['The ']), **kw)
  for kw, message in [({'num_samples': 0}, '--num_samples >= 1'), ({'max_new_tokens': 0}, '--max_new_tokens > 0'),
                      ({'top_p': 0.0}, '0 < --top_p <= 1'), ({'temperature': -1.0}, '--temperature >= 0'),
                      ({'top_k': gpt.dataset.vocab_size + 1}, f'is more than the {gpt.dataset.vocab_size} tokens'),
                      ({'prompts': []}, 'needs at least one --prompt')]:
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
      sample(**kw)
  assert len(sample(prompts=[''], max_new_tokens=3, top_k=gpt.dataset.vocab_size)) == 1  # from the start of a document
  with pytest.raises(UserError, match='--mode=translate needs a non-empty --input'):
    evaluate.translate(tiny_config('transformer'), str(tmp_path / 'mt'), ['one', ' '])
  with pytest.raises(UserError, match='--mode=translate needs a translation model'):
    evaluate.translate(gpt, workdir, ['one'])
