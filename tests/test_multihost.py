"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives), 4 CPU devices each, train like one."""
import os
import subprocess
import sys

import numpy as np
import portpicker

from conftest import ROOT
from helpers import TINY, read_metrics, run_cli, xla_flags


def test_two_processes_train_like_one(tmp_path):
  single = str(tmp_path / 'single')
  run_cli('train.py', '--config=configs/mlp.py', f'--workdir={single}', *TINY, devices=8, check=True)

  multi = str(tmp_path / 'multi')
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  procs = [subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/mlp.py', f'--workdir={multi}', *TINY,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err

  a, b = read_metrics(single), read_metrics(multi)
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for x, y in zip(a, b):
    for k in x:
      if k not in ('step', 'split'):
        np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {x["step"]}')
  data_states = os.listdir(os.path.join(multi, 'checkpoints', '60', 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data_states)
  proc = run_cli('train.py', '--config=configs/mlp.py', f'--workdir={multi}', *TINY, '--config.num_train_steps=80',
                 devices=8)
  assert proc.returncode == 1 and 'was written by 2 process(es) and this run has 1' in proc.stderr, proc.stderr

