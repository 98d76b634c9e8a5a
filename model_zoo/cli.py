"""What train.py and eval.py share: flags, one-line errors, multi-host start-up."""
import difflib
import importlib.util
import os
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from model_zoo.errors import UserError

CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally `file.py:arg`.',
                                         lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory; default runs/<config file name>.')
VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback on errors.')
COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                  'Multi-host: host:port of process 0, for jax.distributed.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')


def _fail(message: str, code: int):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _load_config(path_and_arg: str):
  """The config a `--config=file.py[:arg]` names, loaded the way config_flags will load it."""
  path, _, arg = path_and_arg.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} not found; the configs are in configs/, e.g. --config=configs/mlp.py')
  spec = importlib.util.spec_from_file_location('_model_zoo_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f'{path_and_arg}: {e}') from e


def _check_override_keys(argv):
  """Every `--config.a.b=...` must name a field of the config: a typo is an error, with a suggestion."""
  config_args = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')] + [
      value for flag, value in zip(argv, argv[1:]) if flag == '--config']
  if not config_args:
    raise UserError('--config is required, e.g. --config=configs/mlp.py')
  config = _load_config(config_args[-1])
  known = {k for k, _ in _flatten(config)}
  for a in argv:
    if a.startswith(('--config.', '--noconfig.')):
      key = a.split('=', 1)[0].split('config.', 1)[1]
      if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f'; did you mean {close[0]!r}?' if close else '; see the config file for the keys'
        raise UserError(f'unknown config key {key!r} in {a.split("=", 1)[0]}{hint}')


def _flatten(config, prefix=''):
  for k, v in config.items():
    yield prefix + k, v
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flatten(v, prefix + k + '.')


def _parse_flags(argv):
  """absl's parser, with config mistakes (unknown key, wrong type, bad file) as one line."""
  try:
    if not any(a in ('--help', '--helpshort', '--helpfull') for a in argv):
      _check_override_keys(argv)
    return flags.FLAGS(argv)
  except (UserError, flags.Error) as e:
    if '--verbose' in argv:
      traceback.print_exc()
    _fail(str(e).replace('\n', ' '), 2)


def workdir() -> str:
  if WORKDIR.value:
    return WORKDIR.value
  config_arg = flags.FLAGS['config'].config_filename
  return os.path.join('runs', os.path.splitext(os.path.basename(config_arg.split(':')[0]))[0])


def run(main):
  """Runs `main(config, workdir)` with UserError printed as one line and exit status 1."""

  def absl_main(argv):
    if not VERBOSE.value:
      logging.set_verbosity(logging.ERROR)  # Orbax logs every save; TFDS warns on absent data
    if len(argv) > 1:
      _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
    if COORDINATOR.value:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    try:
      if os.path.exists(workdir()) and not os.path.isdir(workdir()):
        raise UserError(f'--workdir={workdir()} is a file, not a directory')
      main(CONFIG.value, workdir())
    except UserError as e:
      if VERBOSE.value:
        traceback.print_exc()
      _fail(str(e), 1)

  app.run(absl_main, flags_parser=_parse_flags)
