"""What train.py and eval.py share: flags, one-line errors, multi-host start-up."""
import os
import sys
import traceback

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


def _parse_flags(argv):
  """absl's parser, with config mistakes (unknown key, wrong type, bad file) as one line."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS['config'].value is None:
      raise flags.Error('--config is required, e.g. --config=configs/mlp.py')
    flags.FLAGS.config  # loads the file: a missing or broken config file fails here
  except Exception as e:  # pylint: disable=broad-except
    if '--verbose' in argv:
      traceback.print_exc()
    message = str(e).replace('\\n', ' ').replace('\n', ' ').strip('\'"')
    _fail(f'{message} (see --helpshort)', 2)
  return rest


def workdir() -> str:
  if WORKDIR.value:
    return WORKDIR.value
  config_arg = flags.FLAGS['config'].config_filename
  return os.path.join('runs', os.path.splitext(os.path.basename(config_arg.split(':')[0]))[0])


def run(main):
  """Runs `main(config, workdir)` with UserError printed as one line and exit status 1."""

  def absl_main(argv):
    if not VERBOSE.value:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if len(argv) > 1:
      _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
    if COORDINATOR.value:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    try:
      main(CONFIG.value, workdir())
    except UserError as e:
      if VERBOSE.value:
        traceback.print_exc()
      _fail(str(e), 1)

  app.run(absl_main, flags_parser=_parse_flags)
