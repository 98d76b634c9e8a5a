"""A work directory in an object store: train.py, a resume and eval.py on gs://, as on a local disk.

The bucket is gcp-storage-emulator's, on 127.0.0.1: model_zoo's own files reach it through etils.epath
and gcsfs (STORAGE_EMULATOR_HOST), Orbax's arrays through TensorStore's gcs driver
(TENSORSTORE_GCS_HTTP_URL). No code in model_zoo knows it is not Google Cloud Storage.
"""
import json
import os
import re

import numpy as np
import portpicker
import pytest

from conftest import ROOT
from helpers import TIMINGS, TINY, read_metrics, run_cli

gcsfs = pytest.importorskip('gcsfs')
emulator = pytest.importorskip('gcp_storage_emulator.server')

BUCKET = 'model-zoo-test'


def _downloads_with_their_generation():
  """gcp-storage-emulator leaves the x-goog-generation header out of a download; TensorStore reads it there to
  make its next conditional write (Orbax's OCDBT manifest of a second checkpoint), as GCS sends it."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  original = objects.download
  if getattr(original, 'adds_generation', False):
    return

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
    except Exception:  # pylint: disable=broad-except  (absent: the original answers 404)
      pass
    return original(request, response, storage, *args, **kwargs)

  download.adds_generation = True
  objects.download = download   # called by name from objects.get (?alt=media) ...
  for _, handlers in server.HANDLERS:   # ... and routed to directly
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


@pytest.fixture(scope='module')
def bucket():
  """gs://model-zoo-test, served from memory on 127.0.0.1; this process and its children are pointed at it."""
  _downloads_with_their_generation()
  port = portpicker.pick_unused_port()
  server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f'http://127.0.0.1:{port}'
  names = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'NO_GCE_CHECK')
  saved = {k: os.environ.get(k) for k in names}
  # NO_GCE_CHECK: google-auth looks for no metadata server (credentials are not needed by the emulator).
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, NO_GCE_CHECK='True')
  try:
    yield f'gs://{BUCKET}'
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _files(url: str) -> dict[str, bytes]:
  """{path under `url`: contents} of every object under it."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = epath.Path(url)
  out, todo = {}, [root]
  while todo:
    for p in todo.pop().iterdir():
      if p.is_dir():
        todo.append(p)
      else:
        out[str(p)[len(url) + 1:]] = p.read_bytes()
  return out


def _lines(data: bytes, drop=TIMINGS) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in data.decode().splitlines()]


def test_a_gcs_workdir_trains_resumes_and_evaluates_like_a_local_one(bucket, tmp_path):
  local, remote = str(tmp_path / 'local'), f'{bucket}/mlp'
  run_cli('train.py', '--config=configs/mlp.py', f'--workdir={local}', *TINY, check=True)
  killed = run_cli('train.py', '--config=configs/mlp.py', f'--workdir={remote}', *TINY,
                   env={'MODEL_ZOO_KILL_AT': 'step:50:SIGKILL'})
  assert killed.returncode == -9 and 'step 40/60' in killed.stdout
  resumed = run_cli('train.py', '--config=configs/mlp.py', f'--workdir={remote}', *TINY, check=True)
  assert re.search(r'resumed from the checkpoint at step (20|40) in gs://', resumed.stdout)
  run_cli('eval.py', '--config=configs/mlp.py', f'--workdir={remote}', *TINY, check=True)

  files = _files(remote)
  assert _lines(files['metrics.jsonl']) == read_metrics(local)   # the resumed run equals the uninterrupted one
  steps = {name.split('/')[1] for name in files if name.startswith('checkpoints/')}
  assert steps == {'20', '40', '60'}   # the last three of every 20 steps (max_checkpoints_to_keep)
  assert json.loads(files['config.json'])['num_train_steps'] == 60
  evaluated = json.loads(files['eval.json'])
  assert evaluated['step'] == 60 and 0 < evaluated['accuracy'] <= 1
  for png in ('confusion_matrix.png', 'training_curves.png'):
    assert files[png].startswith(b'\x89PNG')
  events = [n for n in files if n.startswith('tensorboard/events.out.tfevents')]
  assert events and all(len(files[n]) > 100 for n in events)
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))   # no local directory named after the URL


def test_a_gpt_in_a_gcs_workdir_keeps_its_tokenizer_and_exports_there(bucket, tmp_path):
  """The tokenizer trained for the run is uploaded from local staging; sampling reads it back; the export
  (staged locally) is copied to <workdir>/export whole."""
  remote = f'{bucket}/gpt'
  tiny = ['--config=configs/gpt.py', f'--workdir={remote}', '--config.model.num_layers=1', '--config.model.d_model=32',
          '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.model.max_len=32',
          '--config.dataset.seq_len=32', '--config.dataset.vocab_size=700', '--config.batch_size=8',
          '--config.num_train_steps=4', '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4',
          '--config.log_every_steps=2', '--config.optimizer.warmup_steps=1']
  run_cli('train.py', *tiny, check=True)
  sampled = run_cli('eval.py', *tiny, '--mode=sample', '--prompt=def ', '--max_new_tokens=4', check=True)
  assert sampled.stdout.count('def ') >= 1
  run_cli('eval.py', *tiny, '--mode=export', check=True)
  files = _files(remote)
  assert files['export/tokenizer.model'] == files['tokenizer.model'] and len(files['tokenizer.model']) > 1000
  exported = {n for n in files if n.startswith('export/')}
  assert {'export/model.safetensors', 'export/config.json'} <= exported
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  weights = load(files['export/model.safetensors'])
  assert weights and all(np.isfinite(w).all() for w in weights.values())
  assert not any('.partial-' in n or '.model_zoo-' in n for n in files)   # no staging left behind


def test_a_bucket_that_cannot_be_written_is_a_clear_error(bucket):
  from model_zoo.errors import UserError  # pylint: disable=g-import-not-at-top
  from model_zoo.workdir import Workdir  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match='cannot be written: no object can be made in gs://no-such-bucket-here'):
    Workdir('gs://no-such-bucket-here/run').check(write=True)
  Workdir(f'{bucket}/fine').check(write=True)
  assert not any(n.startswith('.model_zoo-write-test') for n in _files(bucket))   # the probe object is removed


def test_a_sweep_in_a_bucket_keeps_its_commands_and_table_there(bucket):
  """sweep.py's files in gs:// (its points' training is train.py's, above); SLURM's logs go to the submit
  directory, since SLURM cannot write into a bucket."""
  from helpers import preset  # pylint: disable=g-import-not-at-top
  from model_zoo.training import sweep  # pylint: disable=g-import-not-at-top
  grid = sweep.Sweep(os.path.join(ROOT, 'configs', 'mlp.py'), f'{bucket}/sweep', preset('mlp'), [],
                     sweep.parse_grid('seed=0,1'))
  sh, sbatch = grid.print_commands()
  grid.write()
  files = _files(f'{bucket}/sweep')
  assert set(files) == {'commands.sh', 'sweep.sbatch', 'sweep.json'}
  assert files['commands.sh'].decode() == sh and f'--workdir={bucket}/sweep/01_seed=1' in sh
  assert '#SBATCH --output=model_zoo_sweep_logs/%a.log' in sbatch
  table = json.loads(files['sweep.json'])
  assert [p['status'] for p in table['points']] == ['pending', 'pending']
  assert table['points'][1]['workdir'] == f'{bucket}/sweep/01_seed=1'
