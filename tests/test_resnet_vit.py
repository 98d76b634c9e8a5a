"""ResNet and ViT against numpy references and published parameter counts; synchronised batch norm;
checkpoints with batch statistics; training-time augmentation."""
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from helpers import preset as _preset
from helpers import tiny_config
from model_zoo.config import base_config
from model_zoo.data import pipeline, registry
from model_zoo.data.base import ArraySource, Dataset
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.experiment import build_experiment
from model_zoo.models import registry as models
from model_zoo.models.resnet import ResNet
from model_zoo.models.vit import ViT
from model_zoo.training import loop, sharding

RESNET = {'model.stage_sizes': (1, 1), 'model.width': 8}
VIT = {'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 2, 'model.d_ff': 64}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- numpy references

def _conv(x_BxHxWxC, kernel_KxKxCxF, stride=1, pad=None):
  """Cross-correlation with `pad` zeros on every side (K // 2 by default), one kernel offset at a time."""
  k = kernel_KxKxCxF.shape[0]
  pad = k // 2 if pad is None else pad
  x = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = 0
  for i in range(k):
    for j in range(k):
      out = out + x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] @ kernel_KxKxCxF[i, j]
  return out


def _resnet_reference(p, s, x, block, train, stage_starts=(0, 1)):
  """Logits, and the mean and variance of each BN's input, in float64 (one block per stage)."""
  seen = {}

  def bn(h, scope, name):
    q, r = (p, s) if scope is None else (p[scope], s[scope])
    seen[(scope, name)] = h.mean((0, 1, 2)), h.var((0, 1, 2))
    mean, var = seen[(scope, name)] if train else (r[name]['mean'], r[name]['var'])
    return (h - mean) / np.sqrt(var + 1e-5) * q[name]['scale'] + q[name]['bias']

  relu = lambda h: np.maximum(h, 0)
  h = relu(bn(_conv(x, p['stem_conv']['kernel']), None, 'stem_bn'))
  for k in range(len([name for name in p if name.startswith('block_')])):
    name = f'block_{k}'
    q = p[name]
    stride = 2 if k in stage_starts[1:] else 1
    if block == 'basic':
      y = relu(bn(_conv(h, q['Conv_0']['kernel'], stride), name, 'BatchNorm_0'))
      y = bn(_conv(y, q['Conv_1']['kernel']), name, 'BatchNorm_1')
    else:
      y = relu(bn(_conv(h, q['Conv_0']['kernel']), name, 'BatchNorm_0'))
      y = relu(bn(_conv(y, q['Conv_1']['kernel'], stride), name, 'BatchNorm_1'))
      y = bn(_conv(y, q['Conv_2']['kernel']), name, 'BatchNorm_2')
    short = bn(_conv(h, q['proj_conv']['kernel'], stride), name, 'proj_bn') if 'proj_conv' in q else h
    h = relu(y + short)
  return h.mean((1, 2)) @ p['cls_head']['kernel'] + p['cls_head']['bias'], seen


def _jiggle(tree, seed, scale=0.3):
  """The tree plus noise: zero-initialised biases, class tokens and BN scales become informative."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([np.asarray(x, np.float64) + scale * rng.normal(size=x.shape) for x in leaves])


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
@pytest.mark.parametrize('train', [False, True])
def test_resnet_matches_numpy(block, train):
  model = ResNet(num_classes=5, stage_sizes=(1, 1), block=block, width=4, stem='cifar')
  x = np.random.default_rng(0).normal(size=(3, 6, 6, 3))
  variables = nn.unbox(model.init(jax.random.key(0), x.astype(np.float32), train=False))
  p = _jiggle(variables['params'], 1)
  s = jax.tree.map(lambda a: np.abs(a) + 0.5, _jiggle(variables['batch_stats'], 2))  # positive variances
  cast = lambda t: jax.tree.map(lambda a: a.astype(np.float32), t)
  got, updates = model.apply({'params': cast(p), 'batch_stats': cast(s)}, x.astype(np.float32), train=train,
                             mutable=['batch_stats'])
  want, seen = _resnet_reference(p, s, x, block, train)
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  new = updates['batch_stats']
  assert len(seen) == len(jax.tree.leaves(new)) // 2
  for (scope, name), (mean, var) in seen.items():  # running averages move only in training, by momentum 0.9
    stats, old = (new[name], s[name]) if scope is None else (new[scope][name], s[scope][name])
    np.testing.assert_allclose(stats['mean'], 0.9 * old['mean'] + 0.1 * mean if train else old['mean'], atol=1e-4)
    np.testing.assert_allclose(stats['var'], 0.9 * old['var'] + 0.1 * var if train else old['var'], atol=1e-4)


@pytest.mark.parametrize('depth, stem, num_classes, size, want', [
    ('18', 'imagenet', 1000, 224, 11_689_512),   # torchvision resnet18
    ('34', 'imagenet', 1000, 224, 21_797_672),   # torchvision resnet34
    ('50', 'imagenet', 1000, 224, 25_557_032),   # torchvision resnet50
    ('18', 'cifar', 10, 32, 11_173_962),         # ResNet-18 with the 3x3 stem (kuangliu/pytorch-cifar)
])
def test_resnet_presets_have_the_published_sizes(depth, stem, num_classes, size, want):
  config = _preset('resnet', f'depth={depth}')
  config.model.stem = stem
  model = models.build(config.model, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
  variables = jax.eval_shape(lambda x: nn.unbox(model.init(jax.random.key(0), x, train=False)), x)
  assert _count(variables['params']) == want
  out, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                       mutable=['intermediates']), variables, x)
  assert out.shape == (2, num_classes)
  # Table 1 of the paper: stages at 56, 28, 14, 7 for 224 images; CIFAR stem: 32, 16, 8, 4.
  stage_starts = np.cumsum([0] + list(config.model.stage_sizes[:-1]))
  sides = [state['intermediates'][f'block_{k}']['__call__'][0].shape[1] for k in stage_starts]
  assert sides == ([56, 28, 14, 7] if stem == 'imagenet' else [32, 16, 8, 4])


def _layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _vit_reference(p, x, patch, pool, num_heads):
  b, h, w, c = x.shape
  patches_BxNxPPC = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (h // patch) * (w // patch), patch * patch * c)
  kernel = p['patch_embed']['kernel']
  z = patches_BxNxPPC @ kernel.reshape(-1, kernel.shape[-1]) + p['patch_embed']['bias']
  if pool == 'cls':
    z = np.concatenate([np.broadcast_to(p['cls_embedding'], (b, 1, z.shape[-1])), z], axis=1)
  z = z + p['pos_embedding']
  gelu = lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  for i in range(len([k for k in p if k.startswith('block_')])):
    q = p[f'block_{i}']
    y = _layer_norm(z, q['self_attention_norm'])
    a = q['self_attention']
    qh, kh, vh = (np.einsum('btd,dnh->bnth', y, a[n]['kernel']) for n in ('query', 'key', 'value'))
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    z = z + np.einsum('bnth,nhd->btd', att @ vh, a['out']['kernel'])
    y = _layer_norm(z, q['mlp_norm'])
    m = q['mlp']
    z = z + gelu(y @ m['wi']['kernel'] + m['wi']['bias']) @ m['wo']['kernel'] + m['wo']['bias']
  z = _layer_norm(z, p['final_norm'])
  y = z[:, 0] if pool == 'cls' else z.mean(1)
  return y @ p['cls_head']['kernel'] + p['cls_head']['bias']


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_vit_matches_numpy(pool):
  model = ViT(num_classes=3, patch_size=2, d_model=8, num_layers=2, num_heads=2, d_ff=16, pool=pool)
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 3))
  params = nn.unbox(model.init(jax.random.key(0), x.astype(np.float32), train=False)['params'])
  assert ('cls_embedding' in params) == (pool == 'cls')
  assert params['pos_embedding'].shape == (1, 6 + (pool == 'cls'), 8)  # 2x3 patches (+ the class token)
  p = _jiggle(params, 1)
  got = model.apply({'params': jax.tree.map(lambda a: a.astype(np.float32), p)}, x.astype(np.float32),
                    train=False)
  np.testing.assert_allclose(got, _vit_reference(p, x, 2, pool, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size, want', [
    # timm vit_small_patch16_224 / vit_base_patch16_224, less the attention biases that the shared
    # blocks do not have (4 * d_model per layer)
    ('small', 22_050_664 - 12 * 4 * 384),
    ('base', 86_567_656 - 12 * 4 * 768),
])
def test_vit_presets_have_the_papers_sizes(size, want):
  model = models.build(_preset('vit', f'size={size}').model, num_classes=1000)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: nn.unbox(model.init(jax.random.key(0), x, train=False)['params']), x)
  assert _count(params) == want
  assert params['pos_embedding'].shape[1] == 14 * 14 + 1
  assert jax.eval_shape(lambda p, x: model.apply({'params': p}, x, train=False), params, x).shape == (2, 1000)


def test_bad_model_fields_are_user_errors():
  with pytest.raises(UserError, match='patch_size=3'):
    ViT(num_classes=2, patch_size=3, d_model=8, num_layers=1, num_heads=2, d_ff=8).init(
        jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False)
  with pytest.raises(UserError, match="config.model.stem='cifa' is not one of 'imagenet', 'cifar'"):
    models.build(ml_collections.ConfigDict({'name': 'resnet', 'stem': 'cifa'}), num_classes=2)
  with pytest.raises(UserError, match='depth=one of tiny, 18, 34, 50'):
    _preset('resnet', 'depth=19')


# ---------------------------------------------------------------- training

def _experiment(name, **overrides):
  config = tiny_config(name, **{**(RESNET if name == 'resnet' else VIT), **overrides})
  data = registry.load(config.dataset, 'train')
  return config, data, build_experiment(config, data.info)


@pytest.mark.parametrize('name, learning_rate', [('resnet', 1e-2), ('vit', 3e-3)])
def test_a_few_steps_lower_the_loss(name, learning_rate):
  _, data, exp = _experiment(name, **{'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                                      'optimizer.learning_rate': learning_rate})
  state = exp.init_state()
  batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=32, seed=0)), exp.mesh)
  step = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))
  losses = []
  for i in range(6):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses


def test_batch_norm_statistics_are_those_of_the_global_batch():
  """One step on 8 devices: the stem's BN saw the mean and variance of all 32 examples, as on 1 device."""
  config, data, exp = _experiment('resnet')
  assert exp.mesh.shape['data'] == 8
  state = exp.init_state()
  images = data.source.arrays['image'][:32] + np.repeat(np.arange(8, dtype=np.float32), 4)[:, None, None, None]
  batch = {'image': images, 'label': data.source.arrays['label'][:32]}  # each device's rows: another offset
  step8 = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))
  new8, _ = step8(state, sharding.to_global(batch, exp.mesh), jax.random.key(0))
  assert len(new8.model_state['batch_stats']['stem_bn']['mean'].sharding.device_set) == 8
  host = jax.device_get(state)
  one = jax.devices()[0]
  new1, _ = jax.jit(exp.task.train_step)(jax.device_put(host, one), jax.device_put(batch, one), jax.random.key(0))

  h = _conv(images.astype(np.float64), np.asarray(host.params['stem_conv']['kernel'], np.float64))
  mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
  per_device_var = h.reshape(8, 4, *h.shape[1:]).var((1, 2, 3)).mean(0)  # what unsynchronised BN would see
  assert np.abs(var - per_device_var).max() > 0.1
  stem = jax.device_get(new8.model_state['batch_stats']['stem_bn'])
  np.testing.assert_allclose(stem['mean'], 0.1 * mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stem['var'], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(new8.model_state), jax.device_get(new1.model_state))


def test_checkpoints_hold_batch_statistics_and_resume_exactly(tmp_path):
  """8 steps in one go == 4 steps, then resume to 8 (batch statistics and the augmented stream included)."""
  common = {**RESNET, 'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0, 'log_every_steps': 4, 'eval_every_steps': 4,
            'checkpoint_every_steps': 4}
  config = tiny_config('resnet', num_train_steps=8, **common)
  assert config.dataset.augment == 'crop'
  final = loop.train_and_evaluate(config, str(tmp_path / 'whole'))
  loop.train_and_evaluate(tiny_config('resnet', num_train_steps=4, **common), str(tmp_path / 'parts'))
  loop.train_and_evaluate(config, str(tmp_path / 'parts'))

  data = registry.load(config.dataset, 'train')
  exp = build_experiment(config, data.info)
  whole = jax.device_get(exp.checkpoints(str(tmp_path / 'whole')).restore(8, exp.abstract_state))
  parts = jax.device_get(exp.checkpoints(str(tmp_path / 'parts')).restore(8, exp.abstract_state))
  stats = whole.model_state['batch_stats']
  assert not np.allclose(stats['stem_bn']['mean'], 0) and not np.allclose(stats['stem_bn']['var'], 1)
  for restored in (parts, jax.device_get(final)):
    jax.tree.map(np.testing.assert_array_equal, (whole.params, whole.model_state),
                 (restored.params, restored.model_state))
  lines = [json.loads(line) for line in open(tmp_path / 'whole' / 'metrics.jsonl')]
  train = [r['loss'] for r in lines if r['split'] == 'train']
  assert train[-1] < train[0]
  # eval.py restores the running averages: the same eval loss as the loop measured in memory
  metrics = evaluate.evaluate(config, str(tmp_path / 'whole'))
  assert metrics['loss'] == pytest.approx([r for r in lines if r['split'] == 'eval'][-1]['loss'], rel=1e-6)


# ---------------------------------------------------------------- augmentation

def _dataset(images, augment='', padding=2):
  cfg = base_config().dataset
  cfg.augment, cfg.crop_padding = augment, padding
  from model_zoo.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  source = ArraySource({'image': images, 'label': np.arange(len(images), dtype=np.int32)})
  return Dataset(source, lambda ex: ex, 1, ('a',), augment=augment_lib.build(cfg))


def _images(n=50, seed=0):
  return np.random.default_rng(seed).uniform(0.1, 1.0, size=(n, 6, 5, 2)).astype(np.float32)


def _take(data, n, seed=0, **kw):
  it = pipeline.train_iterator(data, batch_size=10, seed=seed, **kw)
  return [next(it) for _ in range(n)]


def _crop_of(aug, original, p):
  """The (dy, dx, flipped) for which `aug` is that window of `original` padded by p, or None."""
  padded = np.pad(original, ((p, p), (p, p), (0, 0)))
  h, w, _ = original.shape
  for flipped in (False, True):
    for dy in range(2 * p + 1):
      for dx in range(2 * p + 1):
        window = padded[dy:dy + h, dx:dx + w]
        if np.array_equal(aug, window[:, ::-1] if flipped else window):
          return dy, dx, flipped
  return None


@pytest.mark.parametrize('augment', ['crop', 'crop_flip'])
def test_augmented_images_are_crops_of_the_padded_originals(augment):
  images = _images()
  found = []
  for batch in _take(_dataset(images, augment), 20):
    for image, label in zip(batch['image'], batch['label']):
      found.append(_crop_of(image, images[label], 2))
  assert None not in found
  assert {(dy, dx) for dy, dx, _ in found} == {(dy, dx) for dy in range(5) for dx in range(5)}
  flips = np.mean([f for _, _, f in found])
  assert flips == 0 if augment == 'crop' else 0.35 < flips < 0.65


def test_augmentation_is_deterministic_from_the_seed():
  same = np.repeat(_images(1), 20, axis=0)  # one image 20 times: only the crops tell seeds apart
  a, b, c = (_take(_dataset(same, 'crop_flip'), 6, seed=s) for s in (3, 3, 4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  assert not all(np.array_equal(x['image'], a[0]['image']) for x in a[1:])  # each epoch new crops


def test_augmented_stream_is_split_over_processes_and_resumes_exactly():
  data = _dataset(_images(), 'crop_flip')
  whole = _take(data, 8)
  parts = [_take(data, 8, process_index=i, process_count=2) for i in range(2)]
  for step in range(8):
    np.testing.assert_array_equal(np.concatenate([parts[0][step]['image'], parts[1][step]['image']]),
                                  whole[step]['image'])
  it = pipeline.train_iterator(data, batch_size=10, seed=0)
  for _ in range(7):
    next(it)
  resumed = pipeline.train_iterator(data, batch_size=10, seed=0)
  resumed.set_state(it.get_state())
  np.testing.assert_array_equal(next(resumed)['image'], whole[7]['image'])


def test_only_training_augments():
  cfg = _preset('resnet', '').dataset
  train, test = registry.load(cfg, 'train'), registry.load(cfg, 'test')
  assert train.augment is not None and test.augment is not None
  plain = registry.load(base_config().dataset, 'train')
  assert plain.augment is None  # configs without dataset.augment (mlp, cnn, ...) are unchanged
  aug, raw = next(pipeline.train_iterator(train, batch_size=64, seed=0)), next(
      pipeline.train_iterator(plain, batch_size=64, seed=0))
  np.testing.assert_array_equal(aug['label'], raw['label'])  # the same order, other pixels
  assert not np.array_equal(aug['image'], raw['image'])
  seen = np.concatenate([b['image'][b['mask'] > 0] for b in pipeline.eval_batches(test, batch_size=64)])
  np.testing.assert_array_equal(seen, test.source.arrays['image'])


def test_bad_augmentation_settings():
  cfg = base_config().dataset
  cfg.augment = 'flip'
  with pytest.raises(UserError, match="unknown augmentation 'flip'"):
    registry.load(cfg, 'train')
  cfg.augment, cfg.crop_padding = 'crop', -1
  with pytest.raises(UserError, match='crop_padding'):
    registry.load(cfg, 'train')
