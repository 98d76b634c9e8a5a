"""Sweeps: one config trained at several points (sets of overrides), each into its own work directory.

The points come from the config file's `sweep()` (a list of `{dotted key: value}` dicts, big_vision's
style) or from a grid on the command line, `--sweep='optimizer.learning_rate=1e-3,3e-3 batch_size=64,128'`,
whose points are the product of the values (the first key varies slowest). Every point is checked (its keys,
its values' types, the config's ranges) before anything runs or is written.

  <dir>/<point>/       a work directory per point, trained by `train.py` as a user would run it
  <dir>/logs/<point>.log   its output
  <dir>/sweep.json     one row per point: name, overrides, status (done, failed, pending), eval metrics
  <dir>/sweep.png      the chosen metric per point;  <dir>/best_config.json  the best point's config
  <dir>/commands.sh, <dir>/sweep.sbatch   with --print_commands: the commands, and a SLURM job array

A point is done when its metrics.jsonl holds the evaluation at config.num_train_steps; done points are
skipped, and any other point is (re)started with the same command, which resumes it from its latest
checkpoint (model_zoo.training.loop), so a killed sweep is finished by running it again.
"""
import collections
import concurrent.futures
import copy
import difflib
import glob
import inspect
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import ml_collections

from model_zoo import config as config_lib
from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.paths import write_atomically
from model_zoo.training.writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, 'train.py')
HIGHER_IS_BETTER = ('accuracy', 'exact_match', 'bleu', 'chrf', 'f1', 'psnr', 'agreement', 'top5')


def parse_grid(text: str) -> list[dict[str, str]]:
  """'a=1,2 b=x,y' -> the product [{a: 1, b: x}, {a: 1, b: y}, {a: 2, b: x}, {a: 2, b: y}] (values as text)."""
  axes = {}
  for token in text.split():
    key, eq, values = token.partition('=')
    key = key.removeprefix('config.')
    if not eq or not key or not values or '' in values.split(','):
      raise UserError(f'--sweep: {token!r} is not key=value1,value2,... (keys are config fields such as '
                      f'optimizer.learning_rate; values are separated by commas, axes by spaces)')
    if key in axes:
      raise UserError(f'--sweep names {key!r} twice; give all its values once: {key}=v1,v2')
    axes[key] = values.split(',')
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def config_points(spec: str) -> list[dict] | None:
  """The points of the config file's `sweep()` (or `sweep(arg)`), or None when it defines none."""
  path = spec.partition(':')[0]
  module = config_lib._import(path)  # pylint: disable=protected-access
  if not hasattr(module, 'sweep'):
    return None
  arg = spec.partition(':')[2]   # sweep(arg) gets the config's argument, as get_config(arg) does
  points = module.sweep(arg) if inspect.signature(module.sweep).parameters else module.sweep()
  if not isinstance(points, (list, tuple)) or not points or not all(isinstance(p, dict) for p in points):
    raise UserError(f'{path}: sweep() must return a non-empty list of {{"dotted.key": value}} dicts, got '
                    f'{type(points).__name__}')
  return [dict(p) for p in points]


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaf_keys(v, f'{prefix}{k}.')
    else:
      yield prefix + k


def typed_value(current, value, key: str):
  """`value` (text from the command line, or a Python value from sweep()) as the type of the field."""
  if not isinstance(value, str):
    ok = isinstance(value, type(current)) or (isinstance(current, float) and isinstance(value, int)) or current is None
    if not ok or (isinstance(value, bool) and not isinstance(current, bool)):
      raise UserError(f'sweep: {key}={value!r} is a {type(value).__name__}; config.{key} is a {type(current).__name__}')
    return float(value) if isinstance(current, float) else value
  try:
    if isinstance(current, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError('not true or false')
      return value.lower() in ('true', '1')
    if isinstance(current, int):
      return int(value)
    if isinstance(current, float):
      return float(value)
    if isinstance(current, str) or current is None:
      return value
  except ValueError as e:
    raise UserError(f'sweep: {key}={value!r} is not a {type(current).__name__} (config.{key} is '
                    f'{current!r})') from e
  raise UserError(f'sweep: config.{key} is a {type(current).__name__}; the grid sweeps numbers, booleans and '
                  f'strings (give tuples through the config file\'s sweep())')


def _text(value) -> str:
  """A value as train.py's --config.key=... takes it."""
  return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, (tuple, list)) else str(value)


def point_name(index: int, overrides: dict) -> str:
  """A directory name that says what the point is: 00_optimizer.learning_rate=0.001_batch_size=64."""
  body = '_'.join(f'{k}={_text(v)}' for k, v in overrides.items())
  name = re.sub(r'[^A-Za-z0-9._=+-]+', '-', f'{index:02d}_{body}' if body else f'{index:02d}')
  return name[:120]


def _get(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def _set(config, key: str, value):
  *parents, leaf = key.split('.')
  for part in parents:
    config = config[part]
  config[leaf] = value


class Sweep:
  """The points of a sweep of `spec` run into `directory`: `config` is the spec's config with the `base`
  overrides (`--config.a.b=value`, passed to every point's train.py) applied; `points` are each point's own."""

  def __init__(self, spec: str, directory: str, config: ml_collections.ConfigDict, base: list[str],
               points: list[dict], metric: str = '', goal: str = ''):
    path, colon, arg = spec.partition(':')   # the commands run from the repository's root
    self.spec, self.directory, self.base = os.path.abspath(path) + colon + arg, paths.path(directory), list(base)
    if goal not in ('', 'min', 'max'):
      raise UserError(f"--goal must be 'min' or 'max' (or empty: max for {', '.join(HIGHER_IS_BETTER)}, min for "
                      f"the rest), got {goal!r}")
    self.metric, self.given_goal = metric, goal
    if not points:
      raise UserError('the sweep has no points')
    known = set(_leaf_keys(config))
    self.points, self.totals = [], []
    for i, overrides in enumerate(points):
      point = copy.deepcopy(config)
      typed = {}
      for key, value in overrides.items():
        key = key.removeprefix('config.')
        if key not in known:
          close = difflib.get_close_matches(key, sorted(known), n=1)
          raise UserError(f'sweep: unknown config key {key!r}' + (f'; did you mean {close[0]!r}?' if close else
                                                                    '; see the config file for the keys'))
        typed[key] = typed_value(_get(config, key), value, key)
        _set(point, key, typed[key])
      name = point_name(i, typed)
      try:
        config_lib.validate(point)
      except UserError as e:
        raise UserError(f'sweep point {name}: {e}') from e
      self.points.append((name, typed))
      self.totals.append(point.num_train_steps)
    seen = collections.defaultdict(list)
    for name, typed in self.points:
      seen[json.dumps(typed, sort_keys=True, default=str)].append(name)
    twice = [names for names in seen.values() if len(names) > 1]
    if twice:
      raise UserError(f'sweep: the points {", ".join(twice[0])} are the same; each point must differ')

  @property
  def goal(self) -> str:
    return self.given_goal or ('max' if any(h in self.metric for h in HIGHER_IS_BETTER) else 'min')

  def check_directory(self):
    """A UserError when `directory` holds another sweep (another config, or other shared overrides): its
    points' work directories would be taken as this sweep's. A sweep may gain points."""
    path = self.directory / 'sweep.json'
    paths.check_reachable(self.directory, '--workdir')
    if self.directory.exists() and not self.directory.is_dir():
      raise UserError(f'--workdir={self.directory} is a file; a sweep needs a directory')
    if not path.exists():
      return
    try:
      old = json.loads(path.read_text())
      theirs = (old['config'], old['base_overrides'])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f'{path} is damaged ({type(e).__name__}); move it away to start this sweep again (the '
                      f'points\' work directories are kept and finished ones are skipped)') from e
    if theirs != (self.spec, self.base):
      raise UserError(f'{self.directory} holds a sweep of {theirs[0]} with the shared overrides {theirs[1]}, not of '
                      f'{self.spec} with {self.base}: give another --workdir')

  def workdir(self, name: str) -> str:
    return str(self.directory / name)

  def command(self, name: str, overrides: dict) -> list[str]:
    return [sys.executable, TRAIN, f'--config={self.spec}', f'--workdir={self.workdir(name)}', *self.base,
            *(f'--config.{k}={_text(v)}' for k, v in overrides.items())]

  def final_eval(self, index: int) -> dict | None:
    """The point's eval metrics at num_train_steps, if it got there."""
    path = self.directory / self.points[index][0] / 'metrics.jsonl'
    if not path.exists():
      return None
    records, _ = read_metrics(path)
    finals = [r for r in records if r.get('split') == 'eval' and r['step'] == self.totals[index]]
    return {k: v for k, v in finals[-1].items() if k not in ('step', 'split')} if finals else None

  def run(self, parallel: int = 1, log=print) -> list[dict]:
    """Trains every point not yet done (`parallel` at a time; with GPUs, one per GPU), then summarises."""
    gpus = sorted(glob.glob('/dev/nvidia[0-9]*'))
    if parallel < 1 or (gpus and parallel > len(gpus)):
      raise UserError(f'--parallel must be between 1 and the number of local GPUs ({len(gpus)}), got {parallel}'
                      if gpus else f'--parallel must be >= 1, got {parallel}')
    self.check_directory()
    todo = [i for i in range(len(self.points)) if self.final_eval(i) is None]
    for i in sorted(set(range(len(self.points))) - set(todo)):
      log(f'{self.points[i][0]}: done, skipped')
    logs = self.directory / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    failed = {}
    free = list(range(parallel))

    def train(i):
      slot = free.pop()
      name, overrides = self.points[i]
      env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': str(slot)} if gpus else {}))
      log(f'{name}: training' + (f' on GPU {slot}' if gpus else ''))
      target = logs / f'{name}.log'   # appended to by each attempt; in an object store, written after it
      local = target if paths.is_local(target) else _local_file('.log')
      try:
        if local != target and target.exists():
          paths.copy_file(target, local)
        with open(local, 'ab') as out:
          rc = subprocess.run(self.command(name, overrides), stdout=out, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, check=False).returncode
        if local != target:
          paths.copy_file(local, target)
      finally:
        free.append(slot)
        if local != target and os.path.exists(local):
          os.remove(local)
      if rc:
        failed[i] = _last_error(target) or f'exit status {rc}'
      log(f'{name}: ' + (f'failed ({failed[i]})' if rc else 'done'))
      self.write()

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      list(pool.map(train, todo))
    return self.write(failed)

  def rows(self, failed: dict | None = None) -> list[dict]:
    rows = []
    for i, (name, overrides) in enumerate(self.points):
      metrics = self.final_eval(i)
      status = 'done' if metrics else 'failed' if failed and i in failed else 'pending'
      rows.append({'name': name, 'workdir': self.workdir(name), 'overrides': overrides, 'status': status,
                   'metrics': metrics or {}, **({'error': failed[i]} if failed and i in failed else {})})
    return rows

  def best(self, rows: list[dict]) -> dict | None:
    scored = [r for r in rows if self.metric in r['metrics']]
    if not scored:
      return None
    return (max if self.goal == 'max' else min)(scored, key=lambda r: r['metrics'][self.metric])

  def write(self, failed: dict | None = None) -> list[dict]:
    """sweep.json, and when every point has the metric, sweep.png and best_config.json."""
    rows = self.rows(failed)
    done = [r for r in rows if r['status'] == 'done']
    if done and not self.metric:   # the eval loss where the task has one, else its first metric
      self.metric = 'loss' if 'loss' in done[0]['metrics'] else sorted(done[0]['metrics'])[0]
    if done and any(self.metric not in r['metrics'] for r in done):
      names = sorted({k for r in done for k in r['metrics']})
      raise UserError(f'--metric={self.metric!r} is not among the eval metrics of this sweep: {", ".join(names)}')
    best = self.best(rows)
    out = {'config': self.spec, 'base_overrides': self.base, 'metric': self.metric, 'goal': self.goal,
           'best': best and best['name'], 'points': rows}
    write_atomically(self.directory / 'sweep.json', json.dumps(out, indent=2).encode())
    if best and all(r['status'] == 'done' for r in rows):
      write_atomically(self.directory / 'best_config.json', (self.directory / best['name'] / 'config.json').read_bytes())
      self.plot(rows, best)
    return rows

  def plot(self, rows: list[dict], best: dict):
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    values = [r['metrics'][self.metric] for r in rows]
    labels = [r['name'][:2] + '\n' + '\n'.join(f'{k.rsplit(".", 1)[-1]}={_text(v)}' for k, v in r['overrides'].items())
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(rows) + 1.5), 3.8))
    ax.bar(range(len(rows)), values, color=['tab:orange' if r is best else 'tab:blue' for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel(f'eval {self.metric} ({self.goal})')
    ax.set_title(f'sweep of {os.path.basename(self.spec.partition(":")[0])}: best {best["name"][:2]} '
                 f'({self.metric} {best["metrics"][self.metric]:.4g})', fontsize=9)
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-12) if lo > 0 else None, hi + 0.1 * (hi - lo + 1e-12))
    fig.tight_layout()
    paths.save_figure(fig, self.directory / 'sweep.png')
    plt.close(fig)

  def table(self, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r['overrides']))
    best = self.best(rows)
    lines = [' | '.join(['point', *keys, 'status', self.metric]), ' | '.join(['---'] * (len(keys) + 3))]
    for r in rows:
      value = r['metrics'].get(self.metric)
      lines.append(' | '.join([r['name'][:3].rstrip('_') + (' *' if r is best else ''),
                               *(_text(r['overrides'].get(k, '')) for k in keys), r['status'],
                               f'{value:.4f}' if value is not None else '']))
    return '\n'.join(lines)

  def print_commands(self) -> tuple[str, str]:
    """commands.sh (one training command per point) and sweep.sbatch (a SLURM job array of them)."""
    self.check_directory()
    commands = [shlex.join(self.command(n, o)) for n, o in self.points]
    sh = '#!/usr/bin/env bash\n# One line per point of the sweep; run them anywhere, then `python sweep.py` ' \
         'with the same flags gathers sweep.json.\nset -e\ncd ' + shlex.quote(ROOT) + '\n' + '\n'.join(commands) + '\n'
    # SLURM writes its logs itself, which it cannot do into an object store: there, into the submit directory.
    logs = self.directory / 'logs' if paths.is_local(self.directory) else 'model_zoo_sweep_logs'
    sbatch = '\n'.join([
        '#!/usr/bin/env bash', '#SBATCH --job-name=model_zoo_sweep', f'#SBATCH --array=0-{len(commands) - 1}',
        '#SBATCH --gres=gpu:1', f'#SBATCH --output={logs}/%a.log',
        '# sbatch sweep.sbatch; then `python sweep.py` with the same flags gathers sweep.json.',
        f'cd {shlex.quote(ROOT)}', 'COMMANDS=(', *(f'  {shlex.quote(c)}' for c in commands), ')',
        'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', ''])
    if paths.is_local(self.directory):
      os.makedirs(logs, exist_ok=True)
    write_atomically(self.directory / 'commands.sh', sh.encode())
    write_atomically(self.directory / 'sweep.sbatch', sbatch.encode())
    return sh, sbatch


def _local_file(suffix: str) -> str:
  fd, name = tempfile.mkstemp(suffix=suffix)
  os.close(fd)
  return name


def _last_error(log) -> str:
  """The `error: ...` line train.py printed last, if any."""
  try:
    text = paths.path(log).read_bytes().decode(errors='replace')
    errors = [line.strip() for line in text.splitlines() if line.startswith('error: ')]
  except OSError:
    return ''
  return errors[-1].removeprefix('error: ') if errors else ''
