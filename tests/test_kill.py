"""Kill anywhere: training is killed with SIGKILL (model_zoo.training.loop.fault_point) before its first
checkpoint (GPT's chain only), between two checkpoints, during an evaluation and while a checkpoint is being
written, one after another, each time resumed by the same command; the run then ends with parameters and metrics
bit-identical to an uninterrupted one. For GPT (a SentencePiece tokenizer trained by the first, killed, run),
BERT masked-LM (masks drawn from the stream position) and the GAN (two optimizers, an image stream). (The
translation Transformer and the CNN were here too: the first reads its packed rows through GPT's pipeline, and
an image classifier's exact resume is checked by tests/test_cli.py's signals and tests/test_resnet_vit.py's
batch statistics; the suite's time is kept under 10 minutes.)"""
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from helpers import read_metrics, saved_state, xla_flags

STEPS = ['--config.num_train_steps=12', '--config.log_every_steps=2', '--config.eval_every_steps=6',
         '--config.checkpoint_every_steps=4', '--config.max_checkpoints_to_keep=10', '--config.optimizer.warmup_steps=1']
FAMILIES = {
    'gpt': ['--config=configs/gpt.py', '--config.model.num_layers=1', '--config.model.d_model=32',
            '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.seq_len=32',
            '--config.dataset.vocab_size=384', '--config.batch_size=16'],
    'bert_pretrain': ['--config=configs/bert_pretrain.py', '--config.model.num_layers=1', '--config.model.d_model=32',
                      '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.dataset.vocab_size=400',
                      '--config.dataset.seq_len=32', '--config.batch_size=16'],
    'gan': ['--config=configs/gan.py', '--config.model.latent_dim=8', '--config.model.generator_features=8',
            '--config.model.discriminator_features=8', '--config.batch_size=32'],
}
# Where each run of the chain is killed: before the first checkpoint (4); during the evaluation at step 6,
# between checkpoints 4 and 8; while checkpoint 8 is being written. The last run is not killed. A kill before
# any checkpoint leaves nothing to resume whatever the family: it is tried on GPT only (the suite's time).
KILLS = ['step:2', 'eval:6', 'save:8']
FIRST_KILL = {'gpt': 0, 'bert_pretrain': 1, 'gan': 1}


def _train(workdir, args, kill_at=None):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  env.pop('MODEL_ZOO_KILL_AT', None)
  if kill_at:
    env['MODEL_ZOO_KILL_AT'] = kill_at
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args, *STEPS, f'--workdir={workdir}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(FAMILIES))
def test_killed_anywhere_and_resumed_equals_uninterrupted(tmp_path, name):
  reference, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'killed')
  proc = _train(reference, FAMILIES[name])
  assert proc.returncode == 0, proc.stderr
  resumed_from = []   # each run's starting checkpoint, read from what it printed before it was killed
  for kill_at in KILLS[FIRST_KILL[name]:]:
    proc = _train(workdir, FAMILIES[name], kill_at)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-2000:])
    resumed_from.append(_resumed_from(proc.stdout))
  proc = _train(workdir, FAMILIES[name])
  assert proc.returncode == 0, proc.stderr
  resumed_from.append(_resumed_from(proc.stdout))
  # The kill at step 2 left no checkpoint; the one during eval 6 left checkpoint 4 (or none, if its
  # asynchronous write had not committed yet); the one while checkpoint 8 was written left 4 or 8.
  resumed_from = [None] * FIRST_KILL[name] + resumed_from
  assert resumed_from[:2] == [None, None] and resumed_from[2] in (None, 4) and resumed_from[3] in (4, 8), resumed_from
  assert read_metrics(workdir) == read_metrics(reference)
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 12), saved_state(reference, 12))


def _resumed_from(stdout):
  found = re.search(r'resumed from the checkpoint at step (\d+)', stdout)
  return int(found.group(1)) if found else None
