"""The one place that names the files of a work directory.

  config.json              the config of the run (written once every check has passed)
  metrics.jsonl            one JSON object a line: step, split, metrics
  tensorboard/             TensorBoard event files
  checkpoints/<step>/      Orbax checkpoints: state, data (input-pipeline position), log
  checkpoints-skipped/     incomplete or damaged checkpoints that training moved out of the way
  tokenizer.model          a SentencePiece tokenizer trained for the run
  tokens-<split>.npy       an encoded split of a large corpus (lm1b), reused by later runs
  eval.json                eval.py's metrics; training_curves.png, confusion_matrix.png, translations-<split>.tsv,
                           reconstructions.png, interpolation.png, samples.png: its plots and files
  eval-<SCHEME>.json       ... of the model quantized by SCHEME (eval.py --quantize), its plots and files
                           named alike (confusion_matrix-int8.png, translations-<split>-int8.tsv)
  quantized/<SCHEME>/<step>/  the quantized variables of the float checkpoint at <step>, and how they were made
  interpret.json, interpret/   eval.py --mode=interpret: faithfulness figures, and attributions, attention
                           maps or latent views to look at (model_zoo.interpret.report)
  classifier/              the work directory of the classifier that scores a GAN's samples
  export/                  eval.py --mode=export

Nothing else in model_zoo builds these names: loaders, tasks and tools are given paths. Every path is
an `epath.Path` (model_zoo.paths), so the work directory may be local or in an object store
(`--workdir=gs://bucket/run`). Files a data set derives (a tokenizer, an encoded split) are first
written to a local staging directory (`Staging`) and moved in only once config, data, model, mesh
and batch have all been checked, so a run that fails its checks leaves no work directory behind.
"""
import os
import shutil
import tempfile
import uuid

from etils import epath

from model_zoo import paths
from model_zoo.data.base import Files
from model_zoo.errors import UserError


class Workdir:
  """The paths of one work directory (which need not exist yet). With `variant` (a quantization
  scheme), eval.py's metrics, plots and files are those of that variant of the model."""

  def __init__(self, path, variant: str = ''):
    self.path = paths.path(path)
    self.variant = variant

  def _join(self, *names: str) -> epath.Path:
    return self.path.joinpath(*names)

  def _output(self, name: str) -> epath.Path:
    """An eval.py output file, named for the variant: eval.json -> eval-int8.json."""
    stem, ext = os.path.splitext(name)
    return self._join(f'{stem}-{self.variant}{ext}' if self.variant else name)

  @property
  def config(self) -> epath.Path:
    return self._join('config.json')

  @property
  def metrics(self) -> epath.Path:
    return self._join('metrics.jsonl')

  @property
  def tensorboard(self) -> epath.Path:
    return self._join('tensorboard')

  @property
  def checkpoints(self) -> epath.Path:
    return self._join('checkpoints')

  @property
  def tokenizer(self) -> epath.Path:
    return self._join('tokenizer.model')

  def encoded(self, split: str) -> epath.Path:
    return self._join(f'tokens-{split}.npy')

  @property
  def eval(self) -> epath.Path:
    return self._output('eval.json')

  @property
  def training_curves(self) -> epath.Path:
    return self._join('training_curves.png')

  @property
  def confusion_matrix(self) -> epath.Path:
    return self._output('confusion_matrix.png')

  def translations(self, split: str) -> epath.Path:
    return self._output(f'translations-{split}.tsv')

  @property
  def reconstructions(self) -> epath.Path:
    return self._output('reconstructions.png')

  @property
  def interpolation(self) -> epath.Path:
    return self._output('interpolation.png')

  @property
  def samples(self) -> epath.Path:
    return self._output('samples.png')

  @property
  def interpret(self) -> epath.Path:
    return self._output('interpret.json')

  @property
  def interpretations(self) -> epath.Path:
    """eval.py --mode=interpret's pictures (interpret-<SCHEME>/ for a quantized model)."""
    return self._output('interpret')

  def scorer(self, name: str) -> epath.Path:
    """The work directory of a model that scores this run's output (the GAN's 'classifier')."""
    return self._join(name)

  @property
  def export(self) -> epath.Path:
    return self._join('export')

  def quantized(self, scheme: str) -> epath.Path:
    return self._join('quantized', scheme)

  def check(self, write: bool):
    """A UserError, touching nothing, if this cannot be a work directory: a file, a path under a file,
    or (with `write`) a place where no file can be made."""
    paths.check_reachable(self.path, '--workdir')
    if self.path.exists() and not self.path.is_dir():
      raise UserError(f'--workdir={self.path} is a file, not a directory; choose another --workdir')
    if not paths.is_local(self.path):
      if write:   # an object store has no directories: a probe object says whether one can be made here
        probe = self.path.parent / f'.model_zoo-write-test-{uuid.uuid4().hex}'
        try:
          probe.write_bytes(b'')
          probe.unlink()
        except Exception as e:  # pylint: disable=broad-except
          raise UserError(f'--workdir={self.path} cannot be written: no object can be made in {probe.parent} '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); check the bucket '
                          f'and its credentials, or choose another --workdir') from e
      return
    existing = os.fspath(self.path)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise UserError(f'--workdir={self.path} lies under {existing}, which is a file; choose another --workdir')
    if write:
      try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.model_zoo-write-test-')
        os.close(fd)
        os.remove(probe)
      except OSError as e:
        raise UserError(f'--workdir={self.path} cannot be written: no file can be made in {existing} '
                        f'({e.strerror}); choose a writable --workdir') from e

  def has_checkpoints(self) -> bool:
    return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

  def tokenizer_differs(self, other: 'Workdir') -> bool:
    """Both work directories hold a tokenizer file, and the two are not byte-identical."""
    if not (self.tokenizer.exists() and other.tokenizer.exists()):
      return False
    return self.tokenizer.read_bytes() != other.tokenizer.read_bytes()

  def data_files(self, staging: 'Staging | None' = None, tokenizer_from: 'Workdir | None' = None) -> Files:
    """What a data set may reuse from this work directory (or, for the tokenizer, from `tokenizer_from`,
    the run that fine-tuning starts from), and where it writes anything new: into `staging`, or, without
    one, nowhere (it is kept in memory)."""
    tokenizer = self.tokenizer
    staged = staging.path(self.tokenizer.name) if staging is not None else None
    if not tokenizer.exists() and staged and os.path.exists(staged):
      tokenizer = staged   # trained for this run by the split loaded first: the later splits use it
    elif not tokenizer.exists() and tokenizer_from is not None and tokenizer_from.tokenizer.exists():
      tokenizer = tokenizer_from.tokenizer
    if staging is None:
      return Files(tokenizer=tokenizer, encoded=self.encoded)
    return Files(tokenizer=tokenizer, new_tokenizer=staging.path(self.tokenizer.name),
                 encoded=self.encoded, new_encoded=lambda name: staging.path(self.encoded(name).name))


class Staging:
  """A local temporary directory for files on their way into a work directory; removed when closed.

  Placed beside a local work directory where its parent exists, so that `commit` is a rename (for one
  in an object store, in the system's temporary directory: `commit` uploads). It is only created by the
  first file written into it (`path(name)` names one; the writer makes the directory), so a run that
  derives no file leaves no trace at all.
  """

  def __init__(self, workdir: Workdir):
    parent = os.fspath(workdir.path.parent)
    local = paths.is_local(workdir.path) and os.path.isdir(parent)
    self.directory = os.path.join(parent if local else tempfile.gettempdir(),
                                  f'.model_zoo-staging-{uuid.uuid4().hex}')
    self.workdir = workdir

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def commit(self, copies: dict | None = None):
    """Moves every staged file into the work directory (creating it) and copies `copies`
    ({source path: name in the work directory}); a file already there is left as it is."""
    self.workdir.path.mkdir(parents=True, exist_ok=True)
    moves = {self.path(n): n for n in os.listdir(self.directory)} if os.path.isdir(self.directory) else {}
    for source, name in {**moves, **(copies or {})}.items():
      target = self.workdir.path / name
      if target.exists() or not paths.path(source).exists():
        continue
      if source in moves and paths.is_local(target):
        tmp = paths.temp_path(target)
        shutil.move(source, tmp)   # a rename where the staging directory is on the same disk
        os.replace(tmp, target)    # each rename is whole
      else:
        paths.copy_file(source, target)

  def close(self):
    shutil.rmtree(self.directory, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
