"""Interpretation (model_zoo.interpret): the methods against their equations, the PAIR saliency library and a
float64 attention; the sanity and completeness checks on trained models; eval.py --mode=interpret on every
kind of task; and its refusals, which leave the work directory as it was."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import family_config, family_data, tiny_config
from model_zoo import experiment
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.interpret import attributions, report
from model_zoo.models import layers
from model_zoo.tasks import registry as task_registry
from model_zoo.training import loop
from model_zoo.workdir import Workdir


# The methods, against their definitions.

def _linear(seed=0):
  w = jax.random.normal(jax.random.key(seed), (4, 5, 3))
  return w, lambda x: jnp.einsum('bijc,ijc->b', x, w)


def test_methods_on_a_linear_score_are_its_weights_times_the_change():
  """For score(x) = <w, x> every gradient method gives w (x - x') exactly, and one-unit occlusion its sum over
  a unit's features: the equations of the module docstring with a constant gradient."""
  w, score = _linear()
  x = jax.random.uniform(jax.random.key(1), (2, 4, 5, 3))
  b = jnp.full_like(x, 0.25)
  valid = jnp.ones((2, 4, 5), bool)
  want = np.asarray(((x - b) * w[None]).sum(-1))
  kw = dict(steps=7, samples=3, noise=0.1, window=1, key=jax.random.key(2), chunk=2)
  for method in attributions.METHODS:
    got = attributions.attribute(method, score, x, b, valid, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=method)
  # Invalid units are neither changed nor credited.
  valid = valid.at[:, 0].set(False)
  got = attributions.attribute('occlusion', score, x, b, valid, **kw)
  np.testing.assert_allclose(got, np.where(valid, want, 0), rtol=1e-5, atol=1e-5)


def test_occlusion_windows_spread_each_change_over_the_units_they_cover():
  masks = attributions.windows((3,), 2)
  np.testing.assert_array_equal(masks, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
  # score = x0 * x1: hiding {0, 1} or {1, 2} removes the whole product, hiding {2} nothing.
  score = lambda x: x[:, 0, 0] * x[:, 1, 0]
  x = jnp.array([[[2.0], [3.0], [5.0]]])
  got = attributions.occlusion(score, x, jnp.zeros_like(x), jnp.ones((1, 3), bool), size=2)
  np.testing.assert_allclose(got, [[6.0, 6.0, 3.0]])   # unit 2: (6 + 0) / 2 windows


def test_deletion_curve_and_its_area_by_hand():
  """Units deleted in decreasing attribution; with probability = the mean of the kept values the curve is known."""
  x = jnp.array([[[4.0], [1.0], [3.0], [0.0]]])
  attribution = jnp.array([[0.1, 0.9, 0.5, -1.0]])      # order: 1, 2, 0, 3
  probability = lambda z: jnp.sum(z[:, :, 0], 1) / 8.0
  curve = attributions.deletion_curve(probability, x, jnp.zeros_like(x), attribution, jnp.ones((1, 4), bool),
                                      points=4)
  np.testing.assert_allclose(curve, [[8 / 8, 7 / 8, 4 / 8, 0, 0]])
  np.testing.assert_allclose(attributions.area(curve), [(1 + 2 * (7 / 8 + 4 / 8)) / 8])


def test_integrated_gradients_equal_the_saliency_librarys():
  """PAIR saliency's IntegratedGradients sums g at linspace(0, 1, m) of its path, each weighted 1/m. Given the
  path from x' + (x - x')/(2m) to x' + (2m - 1)(x - x')/(2m), its points are our midpoints, and its result is
  ours times (m - 1)/m (its path is that much shorter): the same gradients at the same points."""
  saliency = pytest.importorskip('saliency.core')
  config = tiny_config('cnn')
  data = family_data(config)
  task = task_registry.build(config, data.info)
  image = np.stack([data.preprocess(data.source[i])['image'] for i in range(3)])
  variables = nn.unbox(task.init_state(jax.random.key(0), {'image': image, 'label': np.zeros(3, np.int32)}))
  variables = task.variables(variables)
  logits = lambda x: task.apply(variables['params'], {}, (x,), train=False)[0]
  target, m = 3, 10
  score = lambda x: logits(x)[:, target]
  x, b = jnp.asarray(image), jnp.zeros_like(image) + 0.1
  ours = np.asarray(attributions.integrated_gradients(score, x, b, steps=m, chunk=4))

  grad = jax.jit(jax.grad(lambda x: jnp.sum(score(x))))

  def call_model(points, call_model_args=None, expected_keys=None):
    del call_model_args, expected_keys
    return {saliency.INPUT_OUTPUT_GRADIENTS: np.asarray(grad(jnp.asarray(points, jnp.float32)))}
  for i in range(len(image)):
    d = image[i] - 0.1
    start, end = 0.1 + d / (2 * m), 0.1 + (2 * m - 1) * d / (2 * m)
    theirs = saliency.IntegratedGradients().GetMask(end, call_model, x_baseline=start, x_steps=m, batch_size=4)
    np.testing.assert_allclose(ours[i] * (m - 1) / m, theirs, rtol=2e-4, atol=1e-6)


# Attention maps.

def test_attention_probabilities_equal_a_float64_softmax_and_give_the_fused_output():
  b, t, d, n, k, e = 2, 5, 16, 4, 2, 6        # grouped-query: 4 query heads read 2 key/value heads
  attn = layers.MultiHeadAttention(n, e, k, use_bias=True)
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  segments = jnp.array([[1, 1, 1, 2, 0], [1, 1, 1, 1, 1]])
  mask = layers.Mask(causal=True, q_segments_BxT=segments)
  variables = attn.init(jax.random.key(1), x, mask=mask)
  assert 'intermediates' not in variables        # init never sows
  out, captured = attn.apply(variables, x, mask=mask, mutable=['intermediates'])
  probs = np.asarray(captured['intermediates']['attention_probabilities'][0])
  assert np.all(np.isfinite(probs)) and probs.shape == (b, n, t, t)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables['params']))
  x64 = np.asarray(x, np.float64)
  proj = lambda name, y: np.einsum('btd,dhe->bthe', y, p[name]['kernel']) + p[name]['bias']
  q, kk, v = proj('query', x64), proj('key', x64), proj('value', x64)
  kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)
  logits = np.einsum('bthe,bshe->bhts', q, kk) / np.sqrt(e)
  seg = np.asarray(segments)
  allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None] & np.tril(
      np.ones((t, t), bool))[None, None]
  logits = np.where(allowed, logits, -1e30)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  real = np.asarray(segments)[:, :] != 0        # rows of real queries (a padding query attends to nothing)
  np.testing.assert_allclose(probs.transpose(0, 2, 1, 3)[real], want.transpose(0, 2, 1, 3)[real], atol=1e-6)
  heads = np.einsum('bhts,bshe->bthe', want, v)
  fused = np.einsum('bthe,hed->btd', heads, p['out']['kernel']) + p['out']['bias']
  np.testing.assert_allclose(np.asarray(out)[real], fused[real], atol=1e-5)


@pytest.mark.parametrize('family, layers_expected', [('vit', 2), ('bert', 2), ('gpt', 2), ('transformer', 6)])
def test_every_attention_family_gives_its_maps_per_layer(family, layers_expected):
  config = family_config(family)
  data = family_data(config)
  task = task_registry.build(config, data.info)
  batch = report._examples(data, 2)  # pylint: disable=protected-access
  variables = task.variables(nn.unbox(task.init_state(jax.random.key(0), batch)))
  maps = task.attention(variables, batch)
  assert len(maps) == layers_expected, sorted(maps)
  for name, m in maps.items():
    rows = np.asarray(m).sum(-1)
    np.testing.assert_allclose(rows, 1.0, atol=1e-5, err_msg=name)
  if family == 'gpt':   # causal: nothing above the diagonal
    m = np.asarray(next(iter(maps.values())))
    assert np.abs(np.triu(m, 1)).max() == 0
  if family == 'transformer':
    assert sum('cross_attention' in k for k in maps) == 2


def test_rollout_of_identity_attention_is_the_identity_and_mixes_otherwise():
  eye = np.broadcast_to(np.eye(3), (2, 2, 3, 3))
  np.testing.assert_allclose(report.rollout(eye), np.eye(3))
  uniform = np.full((1, 1, 3, 3), 1 / 3)
  np.testing.assert_allclose(report.rollout(uniform), 0.5 * np.eye(3) + 0.5 / 3)


# Trained models, through the driver.

# Fewer noise samples and deletion points than the defaults (time); integrated gradients at the default steps.
FEWER = {'interpret.smoothgrad_samples': 8, 'interpret.deletion_points': 8}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny CNN that has learnt digits, and a tiny BERT topic classifier trained from scratch."""
  root = tmp_path_factory.mktemp('interpret')
  cnn = tiny_config('cnn', num_train_steps=150, eval_every_steps=150, checkpoint_every_steps=150,
                    **{'interpret.num_examples': 24, **FEWER})
  loop.train_and_evaluate(cnn, str(root / 'cnn'))
  bert = tiny_config('bert_finetune', num_train_steps=40, eval_every_steps=40, checkpoint_every_steps=40,
                     batch_size=16, **{'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2,
                                       'model.d_ff': 64, 'dataset.vocab_size': 400, 'dataset.seq_len': 32,
                                       'optimizer.learning_rate': 1e-3, 'interpret.num_examples': 8, **FEWER})
  return {'cnn': (cnn, str(root / 'cnn')), 'bert': (bert, str(root / 'bert'))}


def _read(workdir):
  with open(os.path.join(workdir, 'interpret.json')) as f:
    return json.load(f)


def test_image_attributions_are_complete_faithful_and_fail_the_sanity_check_only_when_random(trained):
  config, workdir = trained['cnn']
  first = evaluate.interpret(config, workdir)
  got = _read(workdir)
  assert got['num_examples'] == 24 and got['method'] == 'integrated_gradients'
  assert got['ig_completeness_error_max'] < 0.01      # at the default 128 steps
  assert got['randomized_weights_rank_correlation'] < 0.5
  for method in attributions.METHODS:
    assert got[f'deletion_auc/{method}'] < got['deletion_auc/random'], method
  assert set(os.listdir(os.path.join(workdir, 'interpret'))) == {'attributions.png', 'deletion_curve.png'}
  probe = os.path.join(workdir, 'probe')
  open(probe, 'w').close()
  assert os.stat(os.path.join(workdir, 'interpret.json')).st_mode == os.stat(probe).st_mode   # not mkstemp's 0600
  os.remove(probe)
  with open(os.path.join(workdir, 'eval.json')) as f:
    merged = json.load(f)
  assert merged['interpret_step'] == got['step'] == 150 and merged['deletion_auc/random'] == got['deletion_auc/random']
  # The same model and config give the same figures; --method changes the pictures only.
  occluded = evaluate.interpret(config, workdir, 'occlusion')
  assert occluded == {**first, 'method': 'occlusion'} and _read(workdir)['method'] == 'occlusion'


def _bert_workdir(trained):
  config, workdir = trained['bert']
  if not os.path.exists(os.path.join(workdir, 'checkpoints')):
    loop.train_and_evaluate(config, workdir)
  return config, workdir


def test_text_attributions_through_token_embeddings(trained):
  config, workdir = _bert_workdir(trained)
  got = evaluate.interpret(config, workdir, 'gradient_x_input', ['the with statement closes the file'])
  assert got['ig_completeness_error_max'] < 0.01
  for method in attributions.METHODS:
    assert 0 <= got[f'masked_top5_accuracy/{method}'] <= 1
  assert 0 <= got['masked_random5_accuracy'] <= 1
  files = set(os.listdir(os.path.join(workdir, 'interpret')))
  assert files == {'attributions.html', 'deletion_curve.png', 'attention.png'}
  with open(os.path.join(workdir, 'interpret', 'attributions.html')) as f:
    page = f.read()
  assert page.count('<tr>') == 2 and '<td>?</td>' in page   # the header and the one text given, unlabelled


def test_interpretations_of_the_other_tasks(tmp_path):
  """Attention for ViT (with rollout), GPT and the Transformer (an alignment of its own translation), latents
  for the VAE, GPT's next token attributed to the prompt's tokens: each draws its pictures (here of freshly
  initialised models: the driver's path from a checkpoint is the classifiers' above)."""
  runs = {'vit': (family_config('vit'), {'attention.png', 'rollout.png'}, 'attention', []),
          'gpt': (family_config('gpt'), {'attention.png'}, 'attention', ['def f(x):']),
          'transformer': (family_config('transformer', **{'decode.max_len': 12}),
                          {'alignment.png', 'alignment-1.png'}, 'attention', ['three hundred and five', 'twelve']),
          'gpt_next_token': (family_config('gpt', **{'interpret.num_examples': 8, **FEWER}),
                             {'attributions.html', 'deletion_curve.png', 'attention.png'}, 'integrated_gradients',
                             ['def f(x):']),
          'vae': (family_config('vae', **{'interpret.num_examples': 64}),
                  {'latents_pca.png', 'latent_traversal.png'}, 'latents', [])}
  for name, (config, files, method, texts) in runs.items():
    run = experiment.prepare(config, str(tmp_path / name), [config.dataset.eval_split], staging=False)
    got = report.run(run.experiment, run.experiment.init_state(), run.data[config.dataset.eval_split],
                     Workdir(str(tmp_path / name)), method, texts)
    assert set(os.listdir(tmp_path / name / 'interpret')) == files, name
    assert _read(str(tmp_path / name))['method'] == method
    if name == 'transformer':
      assert [t['source'] for t in got['translations']] == texts
    if name == 'vae':
      assert 0 <= got['latent_knn_accuracy'] <= 1 and len(got['pca_explained_variance_ratio']) == 2
    if name == 'gpt_next_token':   # completeness holds for any weights
      assert got['ig_completeness_error_max'] < 0.01 and 0 <= got['masked_top5_accuracy/occlusion'] <= 1


@pytest.mark.parametrize('method, overrides, texts, message', [
    ('attention', {}, [], 'attention maps need a model with attention layers'),
    (None, {'interpret.target': '10'}, [], 'is not a class of this model: use 0..9'),
    (None, {'interpret.steps': 0}, [], 'config.interpret.steps must be an integer >= 1'),
    (None, {'interpret.baseline': 'pad'}, [], "baseline='pad' is not one of"),
    (None, {'interpret.target': 'best'}, [], "must be 'label', 'predicted' or a class index"),
    ('latents', {}, [], '--method=latents does not apply to the classification task'),
    (None, {'interpret.smoothgrad_noise': -0.1}, [], 'smoothgrad_noise must be >= 0'),
    (None, {}, ['a text'], 'does not read text'),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, method, overrides, texts, message):
  config, workdir = trained['cnn']
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, leaf = key.split('.')
    config[section][leaf] = value
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError, match=message):
    evaluate.interpret(config, workdir, method, texts)
  assert sorted(os.listdir(workdir)) == before


def test_a_damaged_eval_json_is_refused_and_kept(trained):
  config, workdir = trained['cnn']
  path = os.path.join(workdir, 'eval.json')
  kept = open(path).read() if os.path.exists(path) else None
  try:
    with open(path, 'w') as f:
      f.write('{"step": 15')
    before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
    with pytest.raises(UserError, match='eval.json cannot be read'):
      evaluate.interpret(config, workdir)
    assert {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)} == before
    assert open(path).read() == '{"step": 15'
  finally:
    if kept is None:
      os.remove(path)
    else:
      with open(path, 'w') as f:
        f.write(kept)


def test_interpret_without_a_checkpoint_or_on_a_gan(tmp_path):
  with pytest.raises(UserError, match='no checkpoint'):
    evaluate.interpret(tiny_config('cnn'), str(tmp_path / 'none'))
  assert not os.path.exists(tmp_path / 'none')
  with pytest.raises(UserError, match='has nothing for the gan task'):
    evaluate.interpret(family_config('dcgan'), str(tmp_path / 'gan'))
