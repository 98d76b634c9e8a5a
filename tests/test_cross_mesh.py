"""Checkpoints restore onto any mesh: a GPT trained on a (2, 2, 2) data x fsdp x tensor mesh resumes on
(8, 1, 1) and evaluates there and on one device with the same metrics; its optimizer state is laid
out like its parameters on every mesh."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import read_metrics, run_cli, saved_state, tiny_config
from model_zoo.evaluation import evaluate
from model_zoo.experiment import prepare
from model_zoo.training import loop

GPT = {'model.num_layers': 2, 'model.d_model': 64, 'model.num_heads': 4, 'model.d_ff': 128, 'dataset.seq_len': 32,
       'batch_size': 16, 'num_train_steps': 20, 'checkpoint_every_steps': 10, 'log_every_steps': 5,
       'eval_every_steps': 10, 'optimizer.warmup_steps': 2}
MESHES = {'2x2x2': {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}, '8x1x1': {'mesh.data': 8}}


def _config(mesh):
  return tiny_config('gpt', **GPT, **MESHES[mesh])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mesh') / 'run')
  loop.train_and_evaluate(_config('2x2x2'), workdir)
  return workdir


def _restored(config, workdir, step):
  run = prepare(config, workdir, [config.dataset.eval_split], staging=False)
  ckpt = run.experiment.checkpoints(workdir)
  try:
    return run.experiment, ckpt.restore(step, run.experiment.abstract_state)
  finally:
    ckpt.close()
    run.close()


@pytest.mark.parametrize('mesh', list(MESHES))
def test_the_optimizer_state_is_sharded_like_the_parameters(trained, mesh):
  exp, state = _restored(_config(mesh), trained, 20)
  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
             if hasattr(s, 'mu')]
  assert moments, state.opt_state
  split = 0
  for moment in moments:
    for tree in (moment.mu, moment.nu):
      for (path, p), (_, m) in zip(params, jax.tree_util.tree_flatten_with_path(tree)[0]):
        assert m.shape == p.shape and m.sharding.is_equivalent_to(p.sharding, p.ndim), jax.tree_util.keystr(path)
        split += m.sharding.shard_shape(m.shape) != m.shape
  assert (split > 0) == (mesh == '2x2x2')   # (8, 1, 1) replicates parameters; (2, 2, 2) splits them
  assert exp.mesh.shape == dict(zip(('data', 'fsdp', 'tensor'), (2, 2, 2) if mesh == '2x2x2' else (8, 1, 1)))


def test_resume_on_another_mesh_and_evaluate_on_one_device(tmp_path, trained):
  # the run as if killed after step 10, resumed on (8, 1, 1)
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(trained, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '20'))
  loop.train_and_evaluate(_config('8x1x1'), workdir)
  ours, theirs = read_metrics(workdir), read_metrics(trained)
  assert [(m['step'], m['split']) for m in ours] == [(m['step'], m['split']) for m in theirs]
  for a, b in zip(ours, theirs):   # the same run up to the order of floating-point sums
    for k in a:
      assert a[k] == (b[k] if isinstance(b[k], str) else pytest.approx(b[k], rel=2e-4)), (a['step'], k)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5),
               saved_state(workdir, 20), saved_state(trained, 20))

  # eval of the (2, 2, 2) run on (8, 1, 1), in this process, and on one device, through eval.py
  on_8 = evaluate.evaluate(_config('8x1x1'), trained)
  on_222 = evaluate.evaluate(_config('2x2x2'), trained)
  args = [f'--config.{k}={v}' for k, v in GPT.items()] + ['--config.optimizer.learning_rate=0.01']
  run_cli('eval.py', '--config=configs/gpt.py', f'--workdir={trained}', *args, devices=1, check=True)
  with open(os.path.join(trained, 'eval.json')) as f:
    on_1 = json.load(f)
  for k in (k for k, v in on_222.items() if isinstance(v, float)):
    assert on_8[k] == pytest.approx(on_222[k], rel=1e-5) and on_1[k] == pytest.approx(on_222[k], rel=1e-5), k


@pytest.mark.parametrize('data, fsdp, tensor', [(8, 1, 1), (2, 2, 2), (1, 8, 1)])
def test_inference_batches_are_split_over_the_batch_axes_and_come_back_whole(data, fsdp, tensor):
  from model_zoo.config import base_config  # pylint: disable=g-import-not-at-top
  from model_zoo.training import sharding  # pylint: disable=g-import-not-at-top
  mesh_config = base_config().mesh
  mesh_config.data, mesh_config.fsdp, mesh_config.tensor = data, fsdp, tensor
  rows = sharding.BatchRows(sharding.make_mesh(mesh_config))
  assert rows.multiple == data * fsdp
  x = np.arange(rows.multiple * 2 * 3, dtype=np.int32).reshape(-1, 3)
  y = rows.put(x)
  assert y.sharding.spec[0] == ('data', 'fsdp')
  assert {s.data.shape for s in y.addressable_shards} == {(x.shape[0] // rows.multiple, 3)}
  np.testing.assert_array_equal(rows.get(y * 2), x * 2)
