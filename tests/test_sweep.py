"""sweep.py: grids and config sweeps checked before anything runs, a 4-point grid on digits trained through
train.py (killed, resumed, skipped when done), and the commands for a cluster."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import TINY, preset, read_metrics, run_cli, xla_flags
from model_zoo.errors import UserError
from model_zoo.training import sweep

MLP = os.path.join(ROOT, 'configs', 'mlp.py')
GRID = 'optimizer.learning_rate=0.003,0.03 seed=0,1'


def _sweep(directory, points, metric='', goal=''):
  return sweep.Sweep(MLP, str(directory), preset('mlp'), [], points, metric, goal)


def test_grid_is_the_product_first_key_slowest():
  assert sweep.parse_grid('a=1,2 config.b=x,y,z') == [
      {'a': '1', 'b': 'x'}, {'a': '1', 'b': 'y'}, {'a': '1', 'b': 'z'},
      {'a': '2', 'b': 'x'}, {'a': '2', 'b': 'y'}, {'a': '2', 'b': 'z'}]


@pytest.mark.parametrize('grid, message', [
    ('batch_size', 'is not key=value1,value2'),
    ('batch_size=', 'is not key=value1,value2'),
    ('batch_size=32,,64', 'is not key=value1,value2'),
    ('seed=0,1 seed=2', "names 'seed' twice"),
])
def test_malformed_grid_is_one_error(grid, message):
  with pytest.raises(UserError, match=message):
    sweep.parse_grid(grid)


@pytest.mark.parametrize('point, message', [
    ({'optimizer.learning_rte': 0.1}, "unknown config key 'optimizer.learning_rte'; did you mean 'optimizer.learning_rate'"),
    ({'batch_size': 'many'}, "batch_size='many' is not a int"),
    ({'model.bias': '1'}, "unknown config key 'model.bias'"),
    ({'batch_size': '0'}, 'config.batch_size must be a positive integer'),
    ({'seed': 1.5}, 'seed=1.5 is a float; config.seed is a int'),
    ({'model.hidden_sizes': '32'}, 'the grid sweeps numbers, booleans and strings'),
])
def test_bad_point_is_refused_before_anything_is_written(tmp_path, point, message):
  config = preset('mlp')
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
    sweep.Sweep(MLP, str(tmp_path / 'sw'), config, [], [{'seed': '0'}, point])
  assert not os.path.exists(tmp_path / 'sw')


def test_points_typed_named_and_same_points_refused(tmp_path):
  run = _sweep(tmp_path, [{'optimizer.learning_rate': '1e-3', 'model.hidden_sizes': (16, 8)}, {'seed': 3}])
  assert run.points == [('00_optimizer.learning_rate=0.001_model.hidden_sizes=-16-8-',
                         {'optimizer.learning_rate': 0.001, 'model.hidden_sizes': (16, 8)}), ('01_seed=3', {'seed': 3})]
  with pytest.raises(UserError, match='the points .* are the same'):
    _sweep(tmp_path, [{'seed': 1}, {'seed': '1'}])
  with pytest.raises(UserError, match="--goal must be 'min' or 'max'"):
    _sweep(tmp_path, [{'seed': 1}], goal='up')


def test_config_file_sweep(tmp_path):
  path = tmp_path / 'swept.py'
  path.write_text('from configs import mlp\n\ndef get_config():\n  return mlp.get_config()\n\n'
                  'def sweep():\n  return [{"seed": s, "optimizer.learning_rate": lr} for s in (0, 1) for lr in (0.1, 0.3)]\n')
  sys.path.insert(0, ROOT)
  assert sweep.config_points(str(path)) == [{'seed': 0, 'optimizer.learning_rate': 0.1},
                                            {'seed': 0, 'optimizer.learning_rate': 0.3},
                                            {'seed': 1, 'optimizer.learning_rate': 0.1},
                                            {'seed': 1, 'optimizer.learning_rate': 0.3}]
  assert sweep.config_points(MLP) is None
  gpt = os.path.join(ROOT, 'configs', 'gpt.py')
  assert sweep.config_points(gpt) == [{'optimizer.learning_rate': lr} for lr in (1e-3, 3e-3, 1e-2)]
  assert sweep.config_points(gpt + ':size=124m') == [{'optimizer.learning_rate': lr} for lr in (3e-4, 6e-4, 1.2e-3)]
  path.write_text('from configs import mlp\n\ndef get_config():\n  return mlp.get_config()\n\ndef sweep():\n  return {}\n')
  with pytest.raises(UserError, match='sweep\\(\\) must return a non-empty list'):
    sweep.config_points(str(path))


def test_print_commands_writes_the_commands_and_a_slurm_array(tmp_path):
  proc = run_cli('sweep.py', '--config=configs/mlp.py', f'--workdir={tmp_path}/sw', f'--sweep={GRID}',
                 '--config.num_train_steps=7', '--print_commands', check=True)
  commands = (tmp_path / 'sw' / 'commands.sh').read_text().splitlines()
  train = [c for c in commands if 'train.py' in c]
  assert len(train) == 4 and train == [line for line in proc.stdout.splitlines() if 'train.py' in line]
  assert all('--config.num_train_steps=7' in c for c in train)
  assert '--config.optimizer.learning_rate=0.03 --config.seed=1' in train[3]
  assert f'--workdir={tmp_path}/sw/03_optimizer.learning_rate=0.03_seed=1' in train[3]
  sbatch = (tmp_path / 'sw' / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-3' in sbatch and 'SLURM_ARRAY_TASK_ID' in sbatch
  # The array's commands are the same, as bash reads them back.
  listed = subprocess.run(['bash', '-c', sbatch.split('eval ')[0].split('\n', 1)[1].replace('cd ', ': ') +
                           'printf "%s\\n" "${COMMANDS[@]}"'], capture_output=True, text=True, check=True)
  assert listed.stdout.splitlines() == train
  assert sorted(os.listdir(tmp_path / 'sw')) == ['commands.sh', 'logs', 'sweep.sbatch']
  (tmp_path / 'sw' / 'sweep.json').write_text('{"config": ')
  proc = run_cli('sweep.py', '--config=configs/mlp.py', f'--workdir={tmp_path}/sw', f'--sweep={GRID}')
  assert proc.returncode == 1 and 'sweep.json is damaged' in proc.stderr


def test_no_points_is_one_error(tmp_path):
  proc = run_cli('sweep.py', '--config=configs/mlp.py', f'--workdir={tmp_path}/sw')
  assert proc.returncode == 1 and 'defines no sweep() and --sweep is not given' in proc.stderr
  assert not os.path.exists(tmp_path / 'sw')


@pytest.mark.slow
def test_four_point_grid_on_digits_killed_resumed_and_skipped(tmp_path):
  directory = tmp_path / 'sw'
  args = ['--config=configs/mlp.py', f'--workdir={directory}', f'--sweep={GRID}', '--metric=accuracy',
          '--parallel=2', *TINY]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), MODEL_ZOO_KILL_AT='step:45')
  killed = subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == 1 and '4 of 4 points did not finish' in killed.stderr, killed.stderr
  rows = json.loads((directory / 'sweep.json').read_text())['points']
  assert [r['status'] for r in rows] == ['failed'] * 4 and all(r['error'] == 'exit status -9' for r in rows)
  assert not (directory / 'best_config.json').exists()

  proc = run_cli('sweep.py', *args, check=True)   # resumes each point from its checkpoint at step 40
  assert proc.stdout.count('training') == 4
  out = json.loads((directory / 'sweep.json').read_text())
  assert out['metric'] == 'accuracy' and out['goal'] == 'max'
  rows = out['points']
  assert [r['status'] for r in rows] == ['done'] * 4
  assert [r['overrides'] for r in rows] == [{'optimizer.learning_rate': lr, 'seed': s}
                                            for lr in (0.003, 0.03) for s in (0, 1)]
  accuracies = [r['metrics']['accuracy'] for r in rows]
  assert all(0.5 < a <= 1 for a in accuracies) and len(set(accuracies)) > 1
  best = max(rows, key=lambda r: r['metrics']['accuracy'])
  assert out['best'] == best['name'] and f'best {best["name"]}' in proc.stdout
  assert json.loads((directory / 'best_config.json').read_text()) == json.loads(
      (directory / best['name'] / 'config.json').read_text())
  assert (directory / 'sweep.png').read_bytes()[:4] == b'\x89PNG'
  assert '| status | accuracy' in proc.stdout

  # A point killed and resumed equals the same point trained without interruption.
  reference = tmp_path / 'reference'
  run_cli('train.py', '--config=configs/mlp.py', f'--workdir={reference}', *TINY,
          '--config.optimizer.learning_rate=0.03', '--config.seed=1', check=True)
  assert read_metrics(directory / rows[3]['name']) == read_metrics(reference)

  again = run_cli('sweep.py', *args, check=True)   # nothing left to train
  assert again.stdout.count('done, skipped') == 4 and 'training' not in again.stdout
  assert json.loads((directory / 'sweep.json').read_text()) == out

  # Another sweep (other shared overrides) into the same directory would take these points for its own.
  other = run_cli('sweep.py', *args, '--config.model.hidden_sizes=(16,)')
  assert other.returncode == 1 and 'holds a sweep of' in other.stderr and 'give another --workdir' in other.stderr
  assert json.loads((directory / 'sweep.json').read_text()) == out
