"""MLP-Mixer, the family added through the README's steps alone: its forward pass against numpy, its
training, and fine-tuning (a new head, freeze=backbone, layer decay, FSDP) on it, ViT and ResNet."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from model_zoo.data import pipeline, registry
from model_zoo.experiment import build_experiment
from model_zoo.models import protocol
from model_zoo.models.mixer import Mixer
from model_zoo.training import loop, optimizers, sharding
from model_zoo.training.checkpoints import Checkpoints

TINY = {
    'mixer': {'model.d_model': 32, 'model.num_layers': 2, 'model.token_mlp_dim': 16, 'model.channel_mlp_dim': 64},
    'vit': {'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'model.d_ff': 64},
    'resnet': {'model.stage_sizes': (1, 1), 'model.width': 8},
}


def _layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _gelu(u):
  return 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))


def _mlp(y, q):
  return _gelu(y @ q['wi']['kernel'] + q['wi']['bias']) @ q['wo']['kernel'] + q['wo']['bias']


def _mixer_reference(p, x, patch):
  """The paper's equations in float64: per-patch embedding, then per layer token mixing (an MLP over the
  patches of each channel) and channel mixing (an MLP over the channels of each patch)."""
  b, h, w, c = x.shape
  patches_BxPxQ = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (h // patch) * (w // patch), patch * patch * c)
  kernel = p['patch_embed']['kernel']
  z_BxPxD = patches_BxPxQ @ kernel.reshape(-1, kernel.shape[-1]) + p['patch_embed']['bias']
  for i in range(len([k for k in p if k.startswith('block_')])):
    q = p[f'block_{i}']
    u_BxDxP = _mlp(_layer_norm(z_BxPxD, q['token_norm']).transpose(0, 2, 1), q['token_mixing'])
    z_BxPxD = z_BxPxD + u_BxDxP.transpose(0, 2, 1)
    z_BxPxD = z_BxPxD + _mlp(_layer_norm(z_BxPxD, q['channel_norm']), q['channel_mixing'])
  y_BxD = _layer_norm(z_BxPxD, p['final_norm']).mean(1)
  return y_BxD @ p['cls_head']['kernel'] + p['cls_head']['bias']


def test_mixer_matches_numpy():
  model = Mixer(num_classes=3, patch_size=2, d_model=8, num_layers=2, token_mlp_dim=5, channel_mlp_dim=16)
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 3))
  params = nn.unbox(model.init(jax.random.key(0), x.astype(np.float32), train=False)['params'])
  assert params['block_0']['token_mixing']['wi']['kernel'].shape == (6, 5)   # 2x3 patches -> D_S
  assert params['block_0']['channel_mixing']['wi']['kernel'].shape == (8, 16)
  assert not np.any(params['cls_head']['kernel'])                            # zero-initialised head
  rng = np.random.default_rng(1)   # random values everywhere, so that a swapped axis or weight shows
  p = jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.3 * rng.normal(size=a.shape), params)
  got = model.apply({'params': jax.tree.map(lambda a: a.astype(np.float32), p)}, x.astype(np.float32), train=False)
  np.testing.assert_allclose(got, _mixer_reference(p, x, 2), rtol=1e-4, atol=1e-4)
  # Token mixing makes each patch's output depend on the other patches; a per-patch MLP could not.
  moved = x.copy()
  moved[:, :2, :2] = 0.0
  changed = np.asarray(model.apply({'params': p}, moved, train=False) - model.apply({'params': p}, x, train=False))
  assert np.abs(changed).max() > 1e-3


def test_mixer_presets_have_the_papers_sizes():
  """Mixer-S/16 and B/16 on 224x224 ImageNet (1000 classes): 18M and 59M parameters (the paper's Table 1;
  exact counts from its official code's shapes)."""
  from helpers import preset  # pylint: disable=g-import-not-at-top
  from model_zoo.models import registry  # pylint: disable=g-import-not-at-top
  for size, want in (('s16', 18_528_264), ('b16', 59_880_472)):
    model = registry.build(preset('mixer', f'size={size}').model, num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    assert protocol.param_count(shapes['params']) == want, size


def test_a_few_steps_lower_the_loss():
  """The config's model and optimizer learn (the full config reaches 0.98 test accuracy: README)."""
  config = tiny_config('mixer', **TINY['mixer'], **{'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                                                    'optimizer.learning_rate': 1e-2})
  data = registry.load(config.dataset, 'train')
  exp = build_experiment(config, data.info)
  state = exp.init_state()
  batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=32, seed=0)), exp.mesh)
  step = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))
  losses = []
  for i in range(6):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses


def _params(workdir):
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    return ckpt.restore_tree(ckpt.latest_step())
  finally:
    ckpt.close()


@pytest.mark.parametrize('name', ['mixer', 'vit', 'resnet'])
def test_finetuning_with_a_new_head_frozen_and_sharded(name, tmp_path, capsys):
  """Pretrain on the ten digits; fine-tune on 6, 7, 8, 9: a new 4-class head, the backbone frozen,
  layer decay on, parameters sharded over 8 devices by FSDP."""
  pre, fine = str(tmp_path / 'pre'), str(tmp_path / 'fine')
  common = {**TINY[name], 'eval_every_steps': 10, 'checkpoint_every_steps': 10}
  loop.train_and_evaluate(tiny_config(name, num_train_steps=10, **common), pre)
  config = tiny_config(name, num_train_steps=6, init_from=pre, freeze='backbone',
                       **{'dataset.classes': '6,7,8,9', 'optimizer.layer_decay': 0.8, 'mesh.data': 1,
                          'mesh.fsdp': 8}, **common)
  state = loop.train_and_evaluate(config, fine)
  assert 'arrays restored; new: cls_head' in capsys.readouterr().out
  kernels = [x for x in jax.tree.leaves(state.params) if x.ndim >= 2 and x.size >= 1024]
  assert kernels and any(x.sharding.shard_shape(x.shape) != x.shape for x in kernels)   # really sharded
  before, after = _params(pre), _params(fine)
  flat = lambda tree: {protocol.path_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  b, a = flat(before['params']), flat(after['params'])
  backbone = [k for k in a if not protocol.is_head(k)]
  assert backbone and all(np.array_equal(a[k], b[k]) for k in backbone)   # frozen: bit for bit
  assert a[('cls_head', 'kernel')].shape[-1] == 4 and b[('cls_head', 'kernel')].shape[-1] == 10
  first = [json.loads(line) for line in open(os.path.join(fine, 'metrics.jsonl'))]
  assert first[0]['split'] == 'train' and np.isfinite(first[0]['loss'])


@pytest.mark.parametrize('name, expected', [
    # path -> depth, with 2 blocks: input layers 0, block_i i + 1, heads and final norm 3
    ('mixer', {('patch_embed', 'kernel'): 0, ('block_0', 'token_mixing', 'wi', 'kernel'): 1,
               ('block_1', 'channel_norm', 'scale'): 2, ('final_norm', 'scale'): 3, ('cls_head', 'kernel'): 3}),
    ('vit', {('patch_embed', 'kernel'): 0, ('pos_embedding',): 0, ('block_0', 'mlp', 'wi', 'kernel'): 1,
             ('block_1', 'self_attention', 'query', 'kernel'): 2, ('final_norm', 'bias'): 3,
             ('cls_head', 'kernel'): 3}),
    ('resnet', {('stem_conv', 'kernel'): 0, ('stem_bn', 'scale'): 0, ('block_0', 'Conv_0', 'kernel'): 1,
                ('block_1', 'proj_conv', 'kernel'): 2, ('cls_head', 'bias'): 3}),
])
def test_layer_decay_follows_the_block_names(name, expected):
  config = tiny_config(name, **TINY[name], **{'optimizer.name': 'sgd', 'optimizer.learning_rate': 1.0,
                                              'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                                              'optimizer.layer_decay': 0.5, 'optimizer.weight_decay': 0.0,
                                              'optimizer.grad_clip_norm': 0.0})
  from model_zoo.models import registry  # pylint: disable=g-import-not-at-top
  model = registry.build(config.model, num_classes=10)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)['params'])
  tx = optimizers.build(config.optimizer, 10)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  got = {protocol.path_names(k): float(v.ravel()[0]) for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  for path, depth in expected.items():
    assert got[path] == pytest.approx(-0.5 ** (3 - depth)), path
