"""The driver owns the work directory: nothing is written into it until config, data, model, mesh and
batch have all been checked, and a run that fails a check leaves no work directory behind."""
import glob
import os

import pytest

from conftest import ROOT
from helpers import tiny_config
from model_zoo.errors import UserError
from model_zoo.training import loop
from model_zoo.workdir import Workdir

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


def _left_behind(parent):
  return sorted(os.listdir(parent))


def test_every_family_has_a_config():
  assert {'mlp', 'cnn', 'resnet', 'vit', 'mixer', 'lstm', 'gpt', 'bert_pretrain', 'bert_finetune', 'transformer',
          'autoencoder', 'vae', 'gan'} == set(CONFIGS)


# A failed check leaves no work directory: tests/test_bad_input.py's table, for every family.


def test_a_tokenizer_is_kept_only_once_every_check_has_passed(tmp_path):
  """BERT's position table is checked after the data (and its new SentencePiece tokenizer): the failure
  comes after the tokenizer was trained, and still nothing is left, in the workdir or beside it."""
  config = tiny_config('bert_pretrain', **{'dataset.vocab_size': 400, 'model.num_layers': 1, 'model.d_model': 32,
                                           'model.num_heads': 2, 'model.d_ff': 32, 'dataset.seq_len': 80,
                                           'model.max_len': 64})
  with pytest.raises(UserError, match='longer than the model.s position table'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert _left_behind(tmp_path) == []


def test_workdir_names_every_file():
  wd = Workdir('runs/x')
  names = {wd.config, wd.metrics, wd.tensorboard, wd.checkpoints, wd.tokenizer, wd.encoded('train'), wd.eval,
           wd.training_curves, wd.confusion_matrix, wd.translations('test'), wd.reconstructions, wd.interpolation,
           wd.samples, wd.scorer('classifier'), wd.export}
  assert len(names) == 15 and all(str(n).startswith(os.path.abspath('runs/x') + '/') for n in names)
  remote = Workdir('gs://bucket/x')   # an object store's paths keep their URL (model_zoo.paths)
  assert str(remote.checkpoints) == 'gs://bucket/x/checkpoints' and str(remote.eval) == 'gs://bucket/x/eval.json'
