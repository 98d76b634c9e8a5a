"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives), 4 CPU devices each, train a GPT with a
SentencePiece tokenizer like one process with 8 devices: process 0 trains the tokenizer and the other uses
it; SIGTERM to one process stops both at the same step with one checkpoint, and the run resumes.
(tests/test_multihost_sharded.py: fine-tuning, export and inference with parameters spanning both.)"""
import os

import numpy as np

from helpers import read_metrics, run_cli, two_processes

GPT = ['--config=configs/gpt.py', '--config.model.num_layers=1', '--config.model.d_model=32',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.seq_len=32',
       '--config.dataset.vocab_size=384', '--config.batch_size=16', '--config.num_train_steps=8',
       '--config.log_every_steps=2', '--config.eval_every_steps=8', '--config.checkpoint_every_steps=100',
       '--config.optimizer.warmup_steps=1']


def test_two_processes_train_a_sentencepiece_gpt_like_one(tmp_path):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  run_cli('train.py', *GPT, f'--workdir={single}', devices=8, check=True)

  # Process 1 is asked to stop after step 3; the processes agree at the next log step, 4.
  outs = two_processes(multi, GPT, stop_at=3)
  assert all('stopped by signal at step 4' in out for out in outs), outs
  assert 'process 1: using the tokenizer that process 0 trained' in outs[1], outs[1]
  assert os.listdir(os.path.join(multi, 'checkpoints')) == ['4']
  data_states = set(os.listdir(os.path.join(multi, 'checkpoints', '4', 'data')))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= data_states, data_states
  with open(os.path.join(single, 'tokenizer.model'), 'rb') as a, open(os.path.join(multi, 'tokenizer.model'),
                                                                      'rb') as b:
    assert a.read() == b.read()

  outs = two_processes(multi, GPT)
  assert all('resumed from the checkpoint at step 4' in out for out in outs), outs
  a, b = read_metrics(single), read_metrics(multi)
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for x, y in zip(a, b):
    for k in set(x) - {'step', 'split'}:   # (read_metrics leaves the timings out)
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {x["step"]}')

  proc = run_cli('train.py', *GPT, f'--workdir={multi}', '--config.num_train_steps=10', devices=8)
  assert proc.returncode == 1 and 'was written by 2 process(es) and this run has 1' in proc.stderr, proc.stderr
