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

Nothing else in model_zoo builds these names: loaders, tasks and tools are given paths. Files a
data set derives (a tokenizer, an encoded split) are first written to a staging directory
(`Staging`) and moved in only once config, data, model, mesh and batch have all been checked, so
a run that fails its checks leaves no work directory behind.
"""
import os
import shutil
import tempfile
import uuid

from model_zoo.data.base import Files, temp_path
from model_zoo.errors import UserError


class Workdir:
  """The paths of one work directory (which need not exist yet). With `variant` (a quantization
  scheme), eval.py's metrics, plots and files are those of that variant of the model."""

  def __init__(self, path: str, variant: str = ''):
    self.path = path
    self.variant = variant

  def _join(self, *names: str) -> str:
    return os.path.join(self.path, *names)

  def _output(self, name: str) -> str:
    """An eval.py output file, named for the variant: eval.json -> eval-int8.json."""
    stem, ext = os.path.splitext(name)
    return self._join(f'{stem}-{self.variant}{ext}' if self.variant else name)

  @property
  def config(self) -> str:
    return self._join('config.json')

  @property
  def metrics(self) -> str:
    return self._join('metrics.jsonl')

  @property
  def tensorboard(self) -> str:
    return self._join('tensorboard')

  @property
  def checkpoints(self) -> str:
    return self._join('checkpoints')

  @property
  def tokenizer(self) -> str:
    return self._join('tokenizer.model')

  def encoded(self, split: str) -> str:
    return self._join(f'tokens-{split}.npy')

  @property
  def eval(self) -> str:
    return self._output('eval.json')

  @property
  def training_curves(self) -> str:
    return self._join('training_curves.png')

  @property
  def confusion_matrix(self) -> str:
    return self._output('confusion_matrix.png')

  def translations(self, split: str) -> str:
    return self._output(f'translations-{split}.tsv')

  @property
  def reconstructions(self) -> str:
    return self._output('reconstructions.png')

  @property
  def interpolation(self) -> str:
    return self._output('interpolation.png')

  @property
  def samples(self) -> str:
    return self._output('samples.png')

  @property
  def interpret(self) -> str:
    return self._output('interpret.json')

  @property
  def interpretations(self) -> str:
    """eval.py --mode=interpret's pictures (interpret-<SCHEME>/ for a quantized model)."""
    return self._output('interpret')

  def scorer(self, name: str) -> str:
    """The work directory of a model that scores this run's output (the GAN's 'classifier')."""
    return self._join(name)

  @property
  def export(self) -> str:
    return self._join('export')

  def quantized(self, scheme: str) -> str:
    return self._join('quantized', scheme)

  def check(self, write: bool):
    """A UserError, touching nothing, if this cannot be a work directory: a file, a path under a file,
    or (with `write`) a place where no file can be made."""
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise UserError(f'--workdir={self.path} is a file, not a directory; choose another --workdir')
    existing = os.path.abspath(self.path)
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
    return os.path.isdir(self.checkpoints) and bool(os.listdir(self.checkpoints))

  def tokenizer_differs(self, other: 'Workdir') -> bool:
    """Both work directories hold a tokenizer file, and the two are not byte-identical."""
    if not (os.path.exists(self.tokenizer) and os.path.exists(other.tokenizer)):
      return False
    with open(self.tokenizer, 'rb') as f, open(other.tokenizer, 'rb') as g:
      return f.read() != g.read()

  def data_files(self, staging: 'Staging | None' = None, tokenizer_from: 'Workdir | None' = None) -> Files:
    """What a data set may reuse from this work directory (or, for the tokenizer, from `tokenizer_from`,
    the run that fine-tuning starts from), and where it writes anything new: into `staging`, or, without
    one, nowhere (it is kept in memory)."""
    tokenizer = self.tokenizer
    staged = staging.path(os.path.basename(self.tokenizer)) if staging is not None else None
    if not os.path.exists(tokenizer) and staged and os.path.exists(staged):
      tokenizer = staged   # trained for this run by the split loaded first: the later splits use it
    elif not os.path.exists(tokenizer) and tokenizer_from is not None and os.path.exists(tokenizer_from.tokenizer):
      tokenizer = tokenizer_from.tokenizer
    if staging is None:
      return Files(tokenizer=tokenizer, encoded=self.encoded)
    return Files(tokenizer=tokenizer, new_tokenizer=staging.path(os.path.basename(self.tokenizer)),
                 encoded=self.encoded, new_encoded=lambda name: staging.path(os.path.basename(self.encoded(name))))


class Staging:
  """A temporary directory for files on their way into a work directory; removed when closed.

  Placed beside the work directory where its parent exists, so that `commit` is a rename. It is
  only created by the first file written into it (`path(name)` names one; the writer makes the
  directory), so a run that derives no file leaves no trace at all.
  """

  def __init__(self, workdir: Workdir):
    parent = os.path.dirname(os.path.abspath(workdir.path))
    self.directory = os.path.join(parent if os.path.isdir(parent) else tempfile.gettempdir(),
                                  f'.model_zoo-staging-{uuid.uuid4().hex}')
    self.workdir = workdir

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def commit(self, copies: dict[str, str] | None = None):
    """Moves every staged file into the work directory (creating it) and copies `copies`
    ({source path: name in the work directory}); a file already there is left as it is."""
    os.makedirs(self.workdir.path, exist_ok=True)
    moves = {self.path(n): n for n in os.listdir(self.directory)} if os.path.isdir(self.directory) else {}
    for source, name in {**moves, **(copies or {})}.items():
      target = os.path.join(self.workdir.path, name)
      if os.path.exists(target) or not os.path.exists(source):
        continue
      tmp = temp_path(target)
      (shutil.move if source in moves else shutil.copyfile)(source, tmp)
      os.replace(tmp, target)   # each rename is whole

  def close(self):
    shutil.rmtree(self.directory, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
