"""Serves a trained model over HTTP: TensorFlow Serving's REST API for every family, and the OpenAI completions
API for language models and translation (model_zoo/serving/server.py).

  python serve.py --config=configs/cnn.py --workdir=runs/cnn [--port=8501] [--name=cnn]
  python serve.py --export=runs/cnn_hlo --name=cnn          # a StableHLO export (eval.py --format=stablehlo)
  curl -s localhost:8501/v1/models/cnn:predict -d '{"instances": [[[[0.0], ...]]]}'
  python serve.py --config=configs/gpt.py --workdir=runs/gpt       # then the openai package, base_url .../v1

Listens on 127.0.0.1 unless --host says otherwise. --api_key (or $MODEL_ZOO_API_KEY) makes every endpoint but
/healthz need `Authorization: Bearer <key>`. SIGTERM (or Ctrl-C) stops accepting, finishes the requests in
flight and exits 0.
"""
import os

from absl import flags

from model_zoo import cli
from model_zoo.errors import UserError

EXPORT = flags.DEFINE_string('export', None, 'Serve this StableHLO export directory instead of --config/--workdir.')
NAME = flags.DEFINE_string('name', None, 'The model\'s name in the URLs; default the config file\'s stem (cnn) or '
                           'the export directory\'s name.')
HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on; 0.0.0.0 exposes the server to the network.')
PORT = flags.DEFINE_integer('port', 8501, 'Port (TF Serving\'s REST port by default).')
API_KEY = flags.DEFINE_string('api_key', None, 'Bearer token every endpoint but /healthz requires; default '
                              '$MODEL_ZOO_API_KEY, and none if that is unset.')
STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to serve; default the latest.')
MAX_BATCH_SIZE = flags.DEFINE_integer('max_batch_size', 32, 'Most rows one device batch (and one request) holds.')
BATCH_TIMEOUT_MS = flags.DEFINE_float('batch_timeout_ms', 5.0, 'How long a batch waits for more requests.')
BATCHING = flags.DEFINE_bool('batching', True, 'Group concurrent requests into one device batch.')
SLOTS = flags.DEFINE_integer('slots', 8, 'Language models and translation: requests decoded together, one cache '
                             'row each (continuous batching); 1 decodes one request at a time.')


def main(config, workdir):
  from model_zoo.serving import restore, server, servable  # pylint: disable=g-import-not-at-top
  if MAX_BATCH_SIZE.value < 1 or SLOTS.value < 1 or BATCH_TIMEOUT_MS.value < 0 or not 0 < PORT.value < 65536:
    raise UserError(f'--max_batch_size and --slots must be >= 1, --batch_timeout_ms >= 0 and --port in 1..65535; '
                    f'got {MAX_BATCH_SIZE.value}, {SLOTS.value}, {BATCH_TIMEOUT_MS.value}, {PORT.value}')
  if EXPORT.value:
    if config is not None:
      raise UserError('give --export=DIR or --config (with --workdir), not both')
    name = NAME.value or os.path.basename(os.path.normpath(EXPORT.value))
    model = servable.from_export(EXPORT.value, name)
  elif config is None:
    raise UserError('serve.py needs --config=configs/<model>.py (and --workdir) or --export=DIR')
  else:
    name = NAME.value or os.path.splitext(os.path.basename(cli._SPEC[-1].split(':')[0]))[0]  # pylint: disable=protected-access
    model = restore.from_workdir(config, workdir, name, STEP.value)
  api_key = API_KEY.value if API_KEY.value is not None else os.environ.get('MODEL_ZOO_API_KEY', '')
  app = server.build_app(model, api_key=api_key, max_batch_size=MAX_BATCH_SIZE.value,
                         batch_timeout_ms=BATCH_TIMEOUT_MS.value, batching_enabled=BATCHING.value,
                         slots=SLOTS.value)
  endpoint = '/v1/completions' if model.generative else f'/v1/models/{name}:predict'
  print(f'serving {name} (step {model.version}) on http://{HOST.value}:{PORT.value}: POST {endpoint}'
        f'{" (API key required)" if api_key else ""}', flush=True)
  server.serve(app, HOST.value, PORT.value)


if __name__ == '__main__':
  cli.run(main, config_required=False)
