"""Where metrics go: metrics.jsonl, TensorBoard event files, and the console."""
import io
import json
import sys
import time

import jax

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.paths import write_atomically
from model_zoo.workdir import Workdir


def read_metrics(path) -> tuple[list[dict], bool]:
  """The records of a metrics.jsonl, and whether its last line was cut short (a process killed while
  writing it), which is left out. Any other line that is not a JSON object is a UserError."""
  lines = paths.path(path).read_bytes().split(b'\n')
  records, cut = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or 'step' not in record:
        raise ValueError('not a {"step": ...} object')
    except ValueError as e:
      if i == len(lines) - 1:  # no newline after it: the write of this line never finished
        cut = True
        continue
      raise UserError(f'line {i + 1} of {path} is damaged ({str(e).splitlines()[0]}); fix or remove that line '
                      f'(the run\'s checkpoints do not depend on it)') from e
    records.append(record)
  return records, cut


class MetricWriter:
  """Appends `{"step", "split", **metrics}` lines to the workdir's metrics.jsonl (process 0 only).

  On resume from `start_step`, lines written after that step by an interrupted run
  are dropped, so the file ends up as if the run had never stopped. In an object store, which has no
  append, the file is written whole at each line (it is small: a line per logged step).
  """

  def __init__(self, workdir: Workdir, start_step: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.path, kept = workdir.metrics, []
    if self.path.exists():
      records, cut = read_metrics(self.path)
      if cut:
        print(f'left out the last line of {self.path}: it was cut short', flush=True)
      kept = [r for r in records if r['step'] <= start_step]
      if len(kept) < len(records) or cut:  # rewritten whole, so that a kill now loses nothing
        write_atomically(self.path, ''.join(json.dumps(r) + '\n' for r in kept).encode())
    local = paths.is_local(self.path)
    self.file = open(self.path, 'a') if local else None
    self.lines = None if local else [json.dumps(r) + '\n' for r in kept]
    self.tb = _summary_writer()(str(workdir.tensorboard), purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, split: str, metrics: dict[str, float]):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({'step': step, 'split': split, **metrics}) + '\n'
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
    else:
      self.lines.append(line)
      write_atomically(self.path, ''.join(self.lines).encode())
    for k, v in metrics.items():
      self.tb.add_scalar(f'{split}/{k}', v, step)
    self.tb.flush()

  def close(self):
    if self.enabled:
      if self.file is not None:
        self.file.close()
      self.tb.close()


class Progress:
  """Console lines at log steps: step, metrics, steps/s over the last interval, ETA."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.time()

  def rate(self, step: int) -> float:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def report(self, step: int, metrics: dict[str, float], speed: dict[str, float]):
    rate = speed['steps_per_sec']
    eta = int((self.total - step) / max(rate, 1e-9))
    shown = '  '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    extra = ''.join(f'  {k} {v:.3g}' for k, v in speed.items() if k != 'steps_per_sec')
    width = len(str(self.total))
    print(f'step {step:>{width}}/{self.total}  {shown}  {rate:.1f} steps/s{extra}  '
          f'ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}', flush=True)


def _summary_writer():
  """tensorboardX's SummaryWriter. tensorboardX imports torch when it is installed, only to accept torch
  tensors, which we never pass, and the clients of Google Cloud Storage and S3 when they are installed, for
  object stores we write to through epath instead (below): they are hidden while it is imported, saving
  about a second a process for torch and 0.3 s for google-cloud-storage."""
  hidden = [m for m in ('torch', 'google.cloud.storage', 'boto3') if m not in sys.modules]
  for m in hidden:
    sys.modules[m] = None  # `import m` raises ImportError while this is so
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    for m in hidden:
      del sys.modules[m]
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in ('gs', 's3', 'az'):   # instead of its own clients (google-cloud-storage, boto3): through epath
    record_writer.register_writer_factory(scheme, _EventFiles())
  return SummaryWriter


class _EventFiles:
  """tensorboardX's writer factory for an object store: each event file is written whole at every flush
  (an object cannot be appended to), as tensorboardX's own GCS writer does."""

  def directory_check(self, path):
    pass   # an object store has no directories to make

  def open(self, path):
    return _EventFile(path)


class _EventFile:

  def __init__(self, path):
    self.path, self.buffer = paths.path(path), io.BytesIO()

  def write(self, data: bytes):
    self.buffer.write(data)

  def flush(self):
    write_atomically(self.path, self.buffer.getvalue())

  def close(self):
    self.flush()
