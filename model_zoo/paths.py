"""Local paths and object-store URLs (gs://, s3://) alike, through etils.epath, as Orbax and TFDS reach theirs.

Every file of a work directory is named by `model_zoo.workdir.Workdir` as an `epath.Path` and read and
written through it, so `--workdir=gs://bucket/run` needs no change anywhere (with gcsfs installed:
`pip install -e '.[gcs]'`; Orbax writes the arrays through TensorStore's own gcs driver). An object
store differs from a disk in two ways that matter here: an object is written whole or not at all (so
writing one is already atomic), and there is no append and no rename of a directory in one step (so
metrics.jsonl is rewritten whole there, and directories made elsewhere are copied in).

Files on their way into a work directory (a trained tokenizer, an encoded split, an export) are made on
the local disk first; only the finished files travel.
"""
import contextlib
import io
import os
import shutil
import tempfile

from etils import epath
import numpy as np

from model_zoo.errors import UserError

# The process's umask, read once at import (reading it means setting it, which is not safe once threads run).
UMASK = os.umask(0)
os.umask(UMASK)


def is_local(path) -> bool:
  """Whether `path` is on this machine's file system (not a gs://, s3://, ... URL)."""
  return '://' not in os.fspath(path)


def path(p) -> epath.Path:
  """`p` as an epath.Path: a local path made absolute, a URL kept as it is."""
  return epath.Path(os.path.abspath(p) if is_local(p) else p)


def check_reachable(p, flag: str):
  """A UserError if `p` is in an object store whose file-system library is not installed."""
  if is_local(p):
    return
  try:
    path(p).exists()
  except ImportError as e:
    scheme = os.fspath(p).split('://')[0]
    extra = {'gs': " (pip install -e '.[gcs]')"}.get(scheme, '')
    raise UserError(f'{flag}={p} is in an object store ({scheme}://), which needs a library that is not installed: '
                    f'{str(e).splitlines()[0]}{extra}') from e


def write_atomically(target, data: bytes):
  """Writes `data` to `target` so that a reader sees the whole file or none (several processes may)."""
  target = path(target)
  if not is_local(target):
    target.write_bytes(data)   # an object appears whole when its upload completes
    return
  tmp = temp_path(target)
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, target)


def temp_path(target) -> str:
  """A new empty local file next to `target` (its directory made if need be), to be renamed onto it when complete."""
  directory = os.path.dirname(os.fspath(target)) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(target) + '.tmp')
  os.close(fd)
  os.chmod(tmp, 0o666 & ~UMASK)   # mkstemp's is 0600; the file it becomes gets a plain file's mode
  return tmp


def copy_file(source, target):
  """Copies one file (local or not) to `target` (local or not), streaming it; `target` is whole or absent."""
  source, target = path(source), path(target)
  if is_local(target):
    tmp = temp_path(target)
    with source.open('rb') as f, open(tmp, 'wb') as g:
      shutil.copyfileobj(f, g, 1 << 24)
    os.replace(tmp, target)
  else:
    with source.open('rb') as f, target.open('wb') as g:
      shutil.copyfileobj(f, g, 1 << 24)


def put_directory(local: str, target) -> None:
  """Moves the finished local directory `local` to `target`, which must not exist: one rename on the
  same disk, else a copy of every file (the directory is complete once the last one lands) and the
  local one removed."""
  target = path(target)
  if is_local(target):
    os.replace(local, target)
    return
  for root, _, names in os.walk(local):
    for name in names:
      source = os.path.join(root, name)
      copy_file(source, target / os.path.relpath(source, local))
  shutil.rmtree(local, ignore_errors=True)


def save_figure(fig, target):
  """A matplotlib figure as a PNG at `target`, written whole."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  write_atomically(target, buffer.getvalue())


def load_array(source):
  """A .npy file: memory-mapped when local, read whole from an object store."""
  source = path(source)
  if is_local(source):
    return np.load(source, mmap_mode='r')
  return np.load(io.BytesIO(source.read_bytes()))


@contextlib.contextmanager
def staged_directory(target, replace: bool = False):
  """A new local directory to fill, which becomes `target` if the block succeeds and is removed if it raises:
  what is written there is kept whole or not at all. `target` must be absent or empty, or with `replace`
  it is replaced (once the new one is complete). Made beside a local `target` (then renamed); for one in
  an object store, in the system's temporary directory (then copied in)."""
  target = path(target)
  local = is_local(target)
  if local:
    target.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{target.name}.partial-', dir=os.fspath(target.parent) if local else None)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~UMASK)   # mkdtemp's is 0700; what is written here is read by others (a server)
    old = None
    if target.is_dir() and replace and any(target.iterdir()):
      if local:
        old = f'{tmp}-old'
        os.replace(target, old)
      else:
        target.rmtree()
    elif local and target.is_dir():
      target.rmdir()   # empty, as the caller made sure
    put_directory(tmp, target)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
