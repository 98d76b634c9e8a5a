"""What train.py and eval.py share: flags, one-line errors, multi-host start-up."""
import difflib
import os
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from model_zoo import config as config_lib
from model_zoo.errors import UserError

WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory; default runs/<config file name>.')
VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback on errors.')
COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                  'Multi-host: host:port of process 0, for jax.distributed.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
GPU_FLAGS = flags.DEFINE_bool('gpu_flags', False, 'Add XLA\'s GPU performance options to XLA_FLAGS (the latency-hiding '
                               'scheduler, pipelined FSDP collectives, ...: model_zoo.training.perf.GPU_XLA_FLAGS, '
                               'MaxText\'s set); flags already in XLA_FLAGS keep their values.')


def _fail(message: str, code: int):
  """`error: <message>` as one line (a library's multi-line message folded), and exit with `code`."""
  one_line = ' '.join(part.strip() for part in message.splitlines() if part.strip())
  print(f'error: {one_line}', file=sys.stderr, flush=True)
  sys.exit(code)


def _config_spec(argv) -> tuple[str, list[str]]:
  """The value of --config (`file.py[:arg]`), and argv without it."""
  rest, spec, skip = [], None, False
  for i, a in enumerate(argv):
    if skip:
      skip = False
    elif a.startswith('--config='):
      spec = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      spec, skip = argv[i + 1], True
    else:
      rest.append(a)
  if spec is None:
    raise UserError('--config is required, e.g. --config=configs/mlp.py')
  return spec, rest


def _check_override_keys(config, argv):
  """Every `--config.a.b=...` must name a field of the config: a typo is an error, with a suggestion."""
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


_SPEC = []  # the --config value, once parsed
_CONFIG_REQUIRED = [True]


def _parse_flags(argv):
  """absl's parser, with the config read by model_zoo.config.load and its mistakes (a missing or
  broken file, an unknown key, a wrong type) as one line. `--config.a.b=value` overrides go through
  ml_collections' config flag, which checks each value's type against the config's."""
  try:
    if any(a in ('--help', '--helpshort', '--helpfull') for a in argv):
      return flags.FLAGS(argv)
    if not _CONFIG_REQUIRED[-1] and not any(a == '--config' or a.startswith('--config=') for a in argv):
      return flags.FLAGS(argv)   # e.g. serve.py --export=DIR: no config
    spec, rest = _config_spec(argv)
    config = config_lib.load(spec)
    _check_override_keys(config, rest)
    config_flags.DEFINE_config_dict('config', config, 'The config of --config=file.py[:arg], with overrides.',
                                    lock_config=True, sys_argv=rest)
    _SPEC.append(spec)
    return flags.FLAGS(rest)
  except (UserError, flags.Error) as e:
    if '--verbose' in argv:
      traceback.print_exc()
    _fail(str(e), 2)


def config_spec() -> str:
  """The --config value (`file.py[:arg]`)."""
  return _SPEC[-1]


def workdir() -> str:
  if WORKDIR.value:
    return WORKDIR.value
  return os.path.join('runs', os.path.splitext(os.path.basename(_SPEC[-1].split(':')[0]))[0])


def run(main, config_required: bool = True):
  """Runs `main(config, workdir)` with UserError printed as one line and exit status 1. Without
  `config_required`, a command line with no --config gives main None for both."""
  _CONFIG_REQUIRED.append(config_required)

  def absl_main(argv):
    if not VERBOSE.value:
      logging.set_verbosity(logging.ERROR)  # Orbax logs every save; TFDS warns on absent data
    if len(argv) > 1:
      _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
    if GPU_FLAGS.value:
      from model_zoo.training import perf  # pylint: disable=g-import-not-at-top
      perf.use_gpu_xla_flags()
    if COORDINATOR.value:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    try:
      if not _SPEC:
        main(None, None)
        return
      main(flags.FLAGS.config, workdir())
    except UserError as e:
      if VERBOSE.value:
        traceback.print_exc()
      _fail(str(e), 1)

  app.run(absl_main, flags_parser=_parse_flags)
