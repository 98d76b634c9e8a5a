"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives), 4 CPU devices each, train a GPT with a
SentencePiece tokenizer like one process with 8 devices: process 0 trains the tokenizer and the other uses
it; SIGTERM to one process stops both at the same step with one checkpoint, and the run resumes. Fine-tuning
with parameters sharded over both processes' devices (mesh.fsdp=8) reads each process's shards of the
pretrained parameters alone and trains like one process."""
import os
import re
import subprocess
import sys

import numpy as np
import portpicker

from conftest import ROOT
from helpers import read_metrics, run_cli, xla_flags

GPT = ['--config=configs/gpt.py', '--config.model.num_layers=1', '--config.model.d_model=32',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.seq_len=32',
       '--config.dataset.vocab_size=384', '--config.batch_size=16', '--config.num_train_steps=8',
       '--config.log_every_steps=2', '--config.eval_every_steps=8', '--config.checkpoint_every_steps=100',
       '--config.optimizer.warmup_steps=1']


FSDP = ['--config.mesh.fsdp=8', '--config.mesh.data=1']   # each kernel split over both processes' devices


def _two_processes(workdir, stop_at=None, args=GPT, script='train.py'):
  """Runs `script` as processes 0 and 1; process 1 sends itself SIGTERM after step `stop_at`."""
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    env.pop('MODEL_ZOO_KILL_AT', None)
    if stop_at and i == 1:
      env['MODEL_ZOO_KILL_AT'] = f'step:{stop_at}:SIGTERM'
    procs.append(subprocess.Popen(
        [sys.executable, script, *args, f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err
  return [out for out, _ in outputs]


def test_two_processes_train_a_sentencepiece_gpt_like_one(tmp_path):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  run_cli('train.py', *GPT, f'--workdir={single}', devices=8, check=True)

  # Process 1 is asked to stop after step 3; the processes agree at the next log step, 4.
  outs = _two_processes(multi, stop_at=3)
  assert all('stopped by signal at step 4' in out for out in outs), outs
  assert 'process 1: using the tokenizer that process 0 trained' in outs[1], outs[1]
  assert os.listdir(os.path.join(multi, 'checkpoints')) == ['4']
  data_states = set(os.listdir(os.path.join(multi, 'checkpoints', '4', 'data')))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= data_states, data_states
  with open(os.path.join(single, 'tokenizer.model'), 'rb') as a, open(os.path.join(multi, 'tokenizer.model'),
                                                                      'rb') as b:
    assert a.read() == b.read()

  outs = _two_processes(multi)
  assert all('resumed from the checkpoint at step 4' in out for out in outs), outs
  a, b = read_metrics(single), read_metrics(multi)
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for x, y in zip(a, b):
    for k in set(x) - {'step', 'split'}:   # (read_metrics leaves the timings out)
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {x["step"]}')

  proc = run_cli('train.py', *GPT, f'--workdir={multi}', '--config.num_train_steps=10', devices=8)
  assert proc.returncode == 1 and 'was written by 2 process(es) and this run has 1' in proc.stderr, proc.stderr


def test_two_processes_fine_tune_with_parameters_spanning_both_like_one(tmp_path):
  pretrained, single, multi = (str(tmp_path / n) for n in ('pretrained', 'single', 'multi'))
  run_cli('train.py', *GPT, f'--workdir={pretrained}', '--config.num_train_steps=4', devices=8, check=True)
  tune = [*GPT, f'--config.init_from={pretrained}', *FSDP, '--config.num_train_steps=4', '--config.eval_every_steps=4']
  proc = run_cli('train.py', *tune, f'--workdir={single}', devices=8, check=True)
  assert 'arrays restored; new: no head' in proc.stdout
  outs = _two_processes(multi, args=tune)
  assert all('arrays restored; new: no head' in out for out in outs), outs
  a, b = read_metrics(single), read_metrics(multi)
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for x, y in zip(a, b):
    for k in set(x) - {'step', 'split'}:
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {x["step"]}')


def test_two_processes_export_a_bert_whose_parameters_span_both_like_one(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  bert = ['--config=configs/bert_pretrain.py', '--config.model.num_layers=1', '--config.model.d_model=32',
          '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.vocab_size=400',
          '--config.dataset.seq_len=32', '--config.batch_size=16', '--config.num_train_steps=2',
          '--config.eval_every_steps=2', '--config.optimizer.warmup_steps=1', *FSDP]   # a masked LM: hf/ too
  run_cli('train.py', *bert, f'--workdir={workdir}', devices=8, check=True)
  run_cli('eval.py', *bert, f'--workdir={workdir}', '--mode=export', f'--output={tmp_path}/one', devices=8,
          check=True)
  outs = _two_processes(workdir, args=[*bert, '--mode=export', f'--output={tmp_path}/two'], script='eval.py')
  assert all('exported step 2' in out for out in outs), outs
  for name in ('model.safetensors', 'hf/model.safetensors'):
    one, two = load_file(str(tmp_path / 'one' / name)), load_file(str(tmp_path / 'two' / name))
    assert sorted(one) == sorted(two) and len(one) > 5
    for k in one:
      np.testing.assert_array_equal(one[k], two[k], err_msg=k)
  assert sorted(os.listdir(tmp_path / 'one')) == sorted(os.listdir(tmp_path / 'two'))


def _without_gloo(out: str) -> str:
  """The output without the lines gloo prints as it connects the processes."""
  return re.sub(r'\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : '
                r'\d+\n?', '', out)


def test_two_processes_sample_and_translate_like_one(tmp_path):
  """Prompts and sources given to both processes are split over the mesh (fsdp=8: the parameters span both);
  each process decodes its share, and the outputs are one process's."""
  gpt, mt = str(tmp_path / 'gpt'), str(tmp_path / 'mt')
  transformer = ['--config=configs/transformer.py', '--config.model.num_encoder_layers=1',
                 '--config.model.num_decoder_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
                 '--config.model.d_ff=64', '--config.dataset.train_examples=400', '--config.dataset.vocab_size=296',
                 '--config.batch_size=16', '--config.num_train_steps=4', '--config.eval_every_steps=4',
                 '--config.optimizer.warmup_steps=1', '--config.decode.splits=', *FSDP]
  small = [*GPT, *FSDP, '--config.num_train_steps=4', '--config.eval_every_steps=4']
  run_cli('train.py', *small, f'--workdir={gpt}', devices=8, check=True)
  run_cli('train.py', *transformer, f'--workdir={mt}', devices=8, check=True)
  sample = [*small, '--mode=sample', '--prompt=The ', '--prompt=import os', '--prompt=', '--num_samples=3',
            '--max_new_tokens=12', '--temperature=1.0', '--seed=3']
  one = run_cli('eval.py', *sample, f'--workdir={gpt}', devices=8, check=True).stdout
  outs = [_without_gloo(out) for out in _two_processes(gpt, args=sample, script='eval.py')]
  assert one.count('--- prompt:') == 9 and outs[0] == one and '--- prompt' not in outs[1]
  translate = [*transformer, '--mode=translate', '--input=three hundred and five', '--input=twelve',
               '--input=nine thousand']
  one = run_cli('eval.py', *translate, f'--workdir={mt}', devices=8, check=True).stdout
  outs = [_without_gloo(out) for out in _two_processes(mt, args=translate, script='eval.py')]
  assert one.count('\t') == 3 and outs[0] == one, (one, outs)
