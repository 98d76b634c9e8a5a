"""train.py and eval.py as a user runs them: bad input, 1 vs 8 devices, kill and resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from helpers import TINY, read_metrics, run_cli, saved_state, xla_flags

MLP = '--config=configs/mlp.py'


def _snapshot(directory):
  """Every file under `directory` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('trained'))
  run_cli('train.py', MLP, f'--workdir={workdir}', *TINY, check=True)
  return workdir


# What only the command line can get wrong (flag syntax and types) and one data error; the mistakes in
# values, for every family, are tests/test_bad_input.py's table (in-process).
@pytest.mark.parametrize('args, message, code', [
    (['--config.optimizer.learning_rat=0.1'], "unknown config key 'optimizer.learning_rat'.*did you mean 'optimizer.learning_rate'", 2),
    (['--config.batch_size=abc'], 'batch_size=abc', 2),
    (['--config.model.hidden_sizes=(64,x)'], 'hidden_sizes', 1),
    (['--config.dataset.name=cifar10', '--config.dataset.data_dir=/nonexistent/tfds'],
     "'cifar10'.*not available offline.*download=True", 1),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message, code):
  workdir = str(tmp_path / 'run')
  proc = run_cli('train.py', MLP, f'--workdir={workdir}', *args, devices=8)
  assert proc.returncode == code, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert re.search(message, lines[0]), lines[0]
  assert 'Traceback' not in proc.stdout + proc.stderr
  assert not os.path.exists(workdir)


def test_a_diverging_run_stops_with_one_line_and_no_checkpoint_past_its_last_finite_loss(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = run_cli('train.py', MLP, f'--workdir={workdir}', *TINY, '--config.optimizer.learning_rate=1e6',
                 '--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
                 '--config.max_checkpoints_to_keep=100')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  caught = int(re.fullmatch(r'error: training diverged: the loss is not finite by step (\d+)\..*', lines[0]).group(1))
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert saved == list(range(2, caught, 2)), (saved, caught)
  assert all(np.isfinite(r['loss']) for r in read_metrics(workdir) if 'loss' in r)


def test_verbose_shows_the_traceback(tmp_path):
  proc = run_cli('train.py', MLP, f'--workdir={tmp_path}', '--config.model.name=mpl', '--verbose')
  assert proc.returncode == 1 and 'Traceback' in proc.stderr


def test_missing_config_file():
  proc = run_cli('train.py', '--config=configs/nope.py')
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: config file 'configs/nope.py' not found; the configs are in configs/, e.g. --config=configs/mlp.py")


def test_checkpoint_that_does_not_fit_leaves_the_workdir_alone(trained):
  before = _snapshot(trained)
  tiny = [a for a in TINY if 'hidden_sizes' not in a]  # a repeated tuple flag would append
  changed = ['--config.model.hidden_sizes=(48,)', '--config.num_train_steps=80']
  proc = run_cli('train.py', MLP, f'--workdir={trained}', *tiny, *changed)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().startswith(f'error: {trained} holds a run with model.hidden_sizes=[32], but the '
                                        'config has model.hidden_sizes=[48]'), proc.stderr
  proc = run_cli('eval.py', MLP, f'--workdir={trained}', *tiny, *changed)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().startswith(f'error: {trained} holds a run with model.hidden_sizes=[32], but the '
                                        'config has model.hidden_sizes=[48]; evaluate it with'), proc.stderr
  proc = run_cli('eval.py', MLP, f'--workdir={trained}', *TINY, '--config.optimizer.name=sgd')
  assert proc.returncode == 1 and 'not in checkpoint' in proc.stderr, proc.stderr
  assert _snapshot(trained) == before


def test_checkpoint_that_does_not_fit_without_config_json(tmp_path, trained):
  """Without config.json to compare with, the checkpoint's shapes are still checked against the model."""
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained, workdir)
  os.remove(os.path.join(workdir, 'config.json'))
  before = _snapshot(workdir)
  tiny = [a for a in TINY if 'hidden_sizes' not in a]
  for script in ('train.py', 'eval.py'):
    proc = run_cli(script, MLP, f'--workdir={workdir}', *tiny, '--config.model.hidden_sizes=(48,)',
                   '--config.num_train_steps=80')
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith('error: the checkpoint at step 60') and 'does not fit' in proc.stderr
    assert 'block_0/bias: checkpoint (32,) vs model (48,)' in proc.stderr
  assert _snapshot(workdir) == before


def test_resume_with_a_longer_schedule_is_allowed(tmp_path, trained):
  """num_train_steps and reporting intervals may change on resume; what the run computes may not."""
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained, workdir)
  proc = run_cli('train.py', MLP, f'--workdir={workdir}', *TINY, '--config.num_train_steps=70', check=True)
  assert 'resumed from the checkpoint at step 60' in proc.stdout
  proc = run_cli('train.py', MLP, f'--workdir={workdir}', *TINY, '--config.num_train_steps=80', '--config.seed=3')
  assert proc.returncode == 1 and 'holds a run with seed=0, but the config has seed=3' in proc.stderr


def test_eval_without_checkpoint_and_with_unknown_step(tmp_path, trained):
  proc = run_cli('eval.py', MLP, f'--workdir={tmp_path}', *TINY)
  assert proc.returncode == 1 and 'no checkpoint in' in proc.stderr
  proc = run_cli('eval.py', MLP, f'--workdir={trained}', *TINY, '--step=7')
  assert proc.returncode == 1 and 'no checkpoint for step 7' in proc.stderr and '[20, 40, 60]' in proc.stderr


def test_export_to_stablehlo_from_the_command_line(tmp_path, trained):
  """eval.py --mode=export --format=stablehlo: the exported program, run from its files, gives the trained
  model's probabilities (restored in this process) on test images; a mistyped format is one line."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from model_zoo.data import registry  # pylint: disable=g-import-not-at-top
  from model_zoo.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from model_zoo.transfer import stablehlo  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'hlo')
  proc = run_cli('eval.py', MLP, f'--workdir={trained}', *TINY, '--mode=export', '--format=stablehlo',
                 f'--output={out}', check=True)
  assert 'exported model.stablehlo (verified on 4 eval examples' in proc.stdout
  with open(os.path.join(out, 'signature.json')) as f:
    assert json.load(f)['platforms'] == ['cpu', 'cuda']
  config = tiny_config('mlp', **{'model.hidden_sizes': (32,), 'num_train_steps': 60, 'eval_every_steps': 30,
                                 'checkpoint_every_steps': 20})
  _, exp, _, state, _ = evaluate._restore(config, trained, None)  # pylint: disable=protected-access
  test = registry.load(config.dataset, 'test')
  images = np.stack([test.preprocess(test.source[i])['image'] for i in range(50, 57)])
  got = stablehlo.run(out, 'model', load_file(os.path.join(out, 'weights.safetensors')), {'image': images})
  want = jax.nn.softmax(exp.task.predict(state, {'image': images}), -1)
  np.testing.assert_allclose(got['probabilities'], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(got['label'], np.argmax(want, -1))
  proc = run_cli('eval.py', MLP, f'--workdir={trained}', *TINY, '--mode=export', '--format=stablehl',
                 f'--output={tmp_path / "other"}')
  assert proc.returncode == 2 and 'stablehl' in proc.stderr and not os.path.exists(tmp_path / 'other')


def test_one_device_and_eight_devices_train_the_same(tmp_path):
  runs = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f'd{devices}')
    run_cli('train.py', MLP, f'--workdir={workdir}', *TINY, devices=devices, check=True)
    runs[devices] = read_metrics(workdir)
  assert len(runs[1]) == len(runs[8]) == 8
  for a, b in zip(runs[1], runs[8]):
    assert a.keys() == b.keys() and (a['step'], a['split']) == (b['step'], b['split'])
    for k in a:
      if k not in ('step', 'split'):
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {a["step"]}')


# Long enough to be interrupted part way: 400 tiny steps (about 2 s on 2 cores), a checkpoint every 50.
LONG = ['--config.batch_size=16', '--config.model.hidden_sizes=(32,)', '--config.num_train_steps=400',
        '--config.log_every_steps=25', '--config.eval_every_steps=100', '--config.checkpoint_every_steps=50',
        '--config.max_checkpoints_to_keep=20']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  run_cli('train.py', MLP, f'--workdir={workdir}', *LONG, check=True)
  return workdir


def _start_and_wait_for_checkpoint(workdir, step):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen([sys.executable, 'train.py', MLP, f'--workdir={workdir}', *LONG], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', str(step))):
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline
    time.sleep(0.005)
  return proc


def _assert_same_run(workdir, reference):
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 400), saved_state(reference, 400))
  assert read_metrics(workdir) == read_metrics(reference)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_resumes_exactly(tmp_path, uninterrupted, signum):
  workdir = str(tmp_path)
  proc = _start_and_wait_for_checkpoint(workdir, 100)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  stopped = int(out.split('stopped by signal at step ')[1].split(';')[0])
  assert 100 <= stopped < 400
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
  proc = run_cli('train.py', MLP, f'--workdir={workdir}', *LONG, check=True)
  assert f'resumed from the checkpoint at step {stopped}' in proc.stdout
  _assert_same_run(workdir, uninterrupted)



def test_gpu_flags_are_known_to_the_installed_xla():
  """--gpu_flags: XLA refuses to start on a flag it does not know (an invented one shows it), so starting a backend
  with every flag of perf.GPU_XLA_FLAGS checks them against the installed XLA (a CPU ignores them). A flag the
  user already set keeps its value."""
  from model_zoo.training import perf
  code = ('import os; from model_zoo.training import perf; perf.use_gpu_xla_flags(); import jax; jax.devices(); '
          'print(os.environ["XLA_FLAGS"])')
  run = lambda flags, code: subprocess.run([sys.executable, '-c', code], env={**os.environ, 'XLA_FLAGS': flags},
                                           capture_output=True, text=True, timeout=120, cwd=ROOT)
  ok = run('--xla_gpu_enable_triton_gemm=true', code)
  assert ok.returncode == 0, ok.stderr[-3000:]
  flags = ok.stdout.split()
  assert '--xla_gpu_enable_triton_gemm=true' in flags and '--xla_gpu_enable_triton_gemm=false' not in flags
  assert set(perf.GPU_XLA_FLAGS) - set(flags) == {'--xla_gpu_enable_triton_gemm=false'}
  bad = run('--xla_gpu_no_such_flag=true', 'import jax; jax.devices()')
  assert bad.returncode != 0 and 'xla_gpu_no_such_flag' in bad.stderr
  jax.devices()
  with pytest.raises(RuntimeError, match='before anything that starts JAX'):
    perf.use_gpu_xla_flags()   # too late: this process's backends are running
