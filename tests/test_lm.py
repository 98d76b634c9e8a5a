"""GPT language modelling end to end: the loop, eval, sampling, FLOP accounting, sharded layouts."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from model_zoo.data import pipeline, registry
from model_zoo.evaluation import evaluate
from model_zoo.inference import sampling
from model_zoo.experiment import build_experiment
from model_zoo.models import protocol
from model_zoo.models.gpt import GPT
from model_zoo.training import loop, sharding

GPT_TINY = {'model.num_layers': 1, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
            'model.max_len': 64, 'dataset.seq_len': 32, 'dataset.vocab_size': 384, 'batch_size': 16,
            'model.dropout_rate': 0.0}


def test_gpt_trains_evaluates_and_samples(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config('gpt', num_train_steps=30, **GPT_TINY)
  loop.train_and_evaluate(config, workdir)
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = [r for r in lines if r['split'] == 'train']
  assert train[-1]['loss'] < train[0]['loss'] - 0.5
  assert {'tokens_per_sec', 'mfu', 'tflops_per_sec'} <= set(train[-1]) and 0 < train[-1]['mfu'] < 1.5
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))

  metrics = evaluate.evaluate(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval.json')))
  assert {'loss', 'perplexity', 'bits_per_byte'} <= set(saved)
  assert saved['perplexity'] == pytest.approx(np.exp(saved['loss']))
  assert saved['bits_per_byte'] == pytest.approx(saved['nats_per_byte'] / np.log(2))
  assert metrics['bits_per_byte'] < 8  # better than a uniform guess over bytes

  texts = evaluate.sample(config, workdir, ['The with statement', 'import'], max_new_tokens=12,
                          temperature=0.0, top_p=1.0)
  again = evaluate.sample(config, workdir, ['The with statement', 'import'], max_new_tokens=12,
                          temperature=0.0, top_p=1.0)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and texts == again


def test_bits_per_byte_counts_every_byte_of_the_split(tmp_path):
  """The eval's byte count equals the UTF-8 size of the validation documents."""
  from model_zoo.data import text
  config = tiny_config('gpt', num_train_steps=5, **GPT_TINY)
  loop.train_and_evaluate(config, str(tmp_path))
  from model_zoo.workdir import Workdir
  data = registry.load(config.dataset, 'validation', Workdir(str(tmp_path)).data_files())
  exp = build_experiment(config, data.info)
  state = exp.checkpoints(str(tmp_path)).restore(5, exp.abstract_state)
  metrics, stats = loop.make_eval_fn(exp)(state, data)
  docs = text.pydoc(config.dataset, 'validation')
  assert stats['bytes'] == sum(len(d.encode()) for d in docs)
  assert stats['tokens'] == sum(len(data.tokenizer.encode(d)) + 1 for d in docs)  # + EOS per document
  # The loss, by hand: -log softmax of every weighted target of every packed row, in float64.
  rows = [data.preprocess(data.source[i]) for i in range(len(data.source))]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  logits = np.asarray(exp.task.model.apply({'params': jax.device_get(state.params)}, batch['inputs'], train=False,
                                           positions_BxT=batch['positions'], segment_ids_BxT=batch['segment_ids']),
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  loss_sum = float(np.sum(nll * batch['weights']))
  assert metrics['loss'] == pytest.approx(loss_sum / stats['tokens'], rel=1e-5)
  assert metrics['nats_per_byte'] == pytest.approx(loss_sum / sum(len(d.encode()) for d in docs), rel=1e-5)
  assert metrics['bits_per_byte'] == pytest.approx(metrics['nats_per_byte'] / np.log(2))


def _model_and_params(vocab=23, **kw):
  model = GPT(vocab_size=vocab, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32, **kw)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), train=False)['params'])
  return model, params


def test_greedy_generation_equals_argmax_of_the_full_forward_pass():
  model, params = _model_and_params()
  prompt = [1, 5, 7, 9]
  got = sampling.generate(model, params, jnp.array([prompt]), jax.random.key(0), max_new_tokens=8,
                          temperature=0.0)
  tokens = list(prompt)
  # the reference: no cache, the whole sequence each time (padded to one width: causal, so what follows
  # cannot change the last token's logits)
  full = jax.jit(lambda t: model.apply({'params': params}, t, train=False))
  for _ in range(8):
    logits = full(jnp.array([tokens + [0] * (12 - len(tokens))]))
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  assert np.asarray(got)[0].tolist() == tokens[len(prompt):]


def test_prompts_of_different_lengths_decode_as_if_alone():
  model, params = _model_and_params(positional='rotary')
  a, b = [1, 4, 6, 8, 10], [1, 3]
  batch = jnp.array([a, [0] * 3 + b])  # left-padded with pad id 0
  together = sampling.generate(model, params, batch, jax.random.key(0), max_new_tokens=6, temperature=0.0)
  alone = [sampling.generate(model, params, jnp.array([p]), jax.random.key(0), max_new_tokens=6,
                             temperature=0.0)[0] for p in (a, b)]
  np.testing.assert_array_equal(together, jnp.stack(alone))


def test_stop_token_ends_a_row_with_padding():
  model, params = _model_and_params()
  greedy = np.asarray(sampling.generate(model, params, jnp.array([[1, 5]]), jax.random.key(0),
                                        max_new_tokens=10, temperature=0.0))[0]
  eos = int(greedy[2])
  got = np.asarray(sampling.generate(model, params, jnp.array([[1, 5]]), jax.random.key(0), max_new_tokens=10,
                                     temperature=0.0, eos_id=eos))[0]
  first = list(greedy).index(eos)
  assert got[:first + 1].tolist() == greedy[:first + 1].tolist() and (got[first + 1:] == 0).all()


def test_sampling_rules_on_a_fixed_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draw = lambda n, **kw: np.array([int(sampling.sample_logits(logits, jax.random.key(i), **kw)[0])
                                   for i in range(n)])
  freq = np.bincount(draw(2000, temperature=1.0), minlength=4) / 2000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  assert set(draw(300, temperature=1.0, top_k=2)) == {0, 1}
  assert set(draw(300, temperature=1.0, top_p=0.7)) == {0, 1}      # 0.5 + 0.3 >= 0.7
  assert set(draw(100, temperature=1.0, top_p=0.4)) == {0}
  assert int(sampling.sample_logits(logits, jax.random.key(0), temperature=0.0)[0]) == 0
  hot = np.bincount(draw(2000, temperature=2.0), minlength=4) / 2000
  p = np.array([0.5, 0.3, 0.15, 0.05]) ** 0.5
  np.testing.assert_allclose(hot, p / p.sum(), atol=0.04)


@pytest.mark.parametrize('attention_impl, t', [('', 32), ('cudnn', 32), ('', 256), ('xla', 256)])
def test_model_flops_follow_the_formula(attention_impl, t):
  """6 N + 12 L d T per token (Kaplan et al., 2020; PaLM appendix B), N the matmul parameters: the
  count does not depend on the attention kernel (a fused one hides its matmuls in one call; XLA's skips the
  causal blocks above the diagonal at T = 256)."""
  model = GPT(vocab_size=384, num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=256,
              attention_impl=attention_impl, tie_embeddings=False)
  tokens = jnp.zeros((3, t), jnp.int32)
  variables = jax.eval_shape(lambda: model.clone(attention_impl='').init(jax.random.key(0), tokens, train=False))
  d, f, v, layers = 32, 64, 384, 2
  matmul_params = layers * (4 * d * d + 2 * d * f) + v * d   # attention and MLP kernels, the output layer
  assert protocol.flops_per_example(model, variables, tokens) == (6 * matmul_params + 12 * layers * d * t) * t


def test_fsdp_and_tensor_parallel_layouts_shard_parameters_and_agree():
  losses = {}
  for mesh in [(8, 1, 1), (2, 2, 2)]:
    config = tiny_config('gpt', **GPT_TINY, **dict(zip(['mesh.data', 'mesh.fsdp', 'mesh.tensor'], mesh)))
    data = registry.load(config.dataset, 'train', None)
    exp = build_experiment(config, data.info)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(exp.state_shardings.params)[0]}
    if mesh == (2, 2, 2):
      assert specs["['block_0']['mlp']['wi']['kernel']"] == jax.sharding.PartitionSpec('fsdp', 'tensor')
      assert specs["['embed']['embedding']"] == jax.sharding.PartitionSpec('tensor', 'fsdp')
    state = exp.init_state()
    batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=16, seed=0)), exp.mesh)
    step = jax.jit(sharding.constrained(exp.task.train_step, exp.mesh),   # activations constrained, as in training
                   in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None),
                   out_shardings=(exp.state_shardings, None))
    for i in range(3):
      state, metrics = step(state, batch, jax.random.key(i))
    losses[mesh] = float(metrics['loss'])
    assert state.params['block_0']['mlp']['wi']['kernel'].sharding.spec == exp.state_shardings.params[
        'block_0']['mlp']['wi']['kernel'].spec
  assert losses[(8, 1, 1)] == pytest.approx(losses[(2, 2, 2)], rel=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 23)
  model32, params = _model_and_params()
  model16 = model32.clone(dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits32 = jax.jit(lambda p: model32.apply({'params': p}, tokens, train=False))(params)
  logits16 = jax.jit(lambda p: model16.apply({'params': p}, tokens, train=False))(params)
  assert logits16.dtype == jnp.float32  # the loss is computed in float32
  # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%): through two blocks the error stays a
  # few percent of the logits' spread; a wrong computation would be of the order of the spread itself.
  err, spread = float(jnp.max(jnp.abs(logits16 - logits32))), float(jnp.std(logits32))
  assert 0 < err < 0.05 * spread, (err, spread)
  grads = jax.jit(jax.grad(lambda p: model16.apply({'params': p}, tokens, train=False).mean()))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_a_bfloat16_run_trains_through_the_loop(tmp_path):
  config = tiny_config('gpt', **{**GPT_TINY, 'model.dtype': 'bfloat16', 'num_train_steps': 30,
                                 'optimizer.learning_rate': 3e-3})
  loop.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    train = [m for m in map(json.loads, f) if m['split'] == 'train']
  assert all(np.isfinite(m['loss']) for m in train) and train[-1]['loss'] < train[0]['loss'] - 0.5, train


def test_lora_adapters_start_at_the_base_model_and_are_what_freeze_trains():
  from model_zoo.transfer.finetune import trains_when_frozen  # pylint: disable=g-import-not-at-top
  base, _ = _model_and_params()
  lora = base.clone(lora_rank=4)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 23)
  params = nn.unbox(lora.init(jax.random.key(0), tokens, train=False)['params'])
  adapters = [k for k, _ in jax.tree_util.tree_flatten_with_path(params)[0] if trains_when_frozen(
      tuple(str(getattr(p, 'key', p)) for p in k))]
  assert len(adapters) == 2 * 4 * 2   # A and B on q, k, v, out in each of 2 blocks
  from model_zoo.transfer import export  # pylint: disable=g-import-not-at-top
  # B starts at zero: the adapted model is the base model, and merging keeps it
  np.testing.assert_allclose(lora.apply({'params': params}, tokens, train=False),
                             base.apply({'params': export.merge_lora(params, 16.0)}, tokens, train=False), atol=1e-5)


@pytest.mark.parametrize('tie', [True, False])
def test_chunked_cross_entropy_equals_the_whole_logits_and_holds_a_chunk(tie):
  """config.loss_chunks: the same loss, accuracy and gradients as the logits taken whole, with a fraction of the
  memory: the compiled gradient's temporaries shrink by more than the [B, T, V] float32 logits' share."""
  from model_zoo.tasks import losses
  model = GPT(vocab_size=4096, num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=256, tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, 4096)
  targets = jnp.roll(tokens, -1, axis=1)
  weights = (jax.random.uniform(jax.random.key(1), (4, 256)) < 0.9).astype(jnp.float32)
  params = model.init(jax.random.key(2), tokens[:, :8], train=False)['params']

  def sums(params, chunks):
    if not chunks:
      return losses.token_sums(model.apply({'params': params}, tokens, train=False), targets, weights)
    features = model.apply({'params': params}, tokens, train=False, features=True)
    w = model.output_weight(params)
    return losses.chunked_token_sums(features, lambda x: model.logits(w, x), targets, weights, chunks)

  whole, chunked = sums(params, 0), sums(params, 8)
  for k in whole:
    np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5)
  grad = lambda chunks: jax.jit(jax.grad(lambda p: sums(p, chunks)['loss_sum']))
  for a, b in zip(jax.tree.leaves(grad(0)(params)), jax.tree.leaves(grad(8)(params))):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
  temp = {c: grad(c).lower(params).compile().memory_analysis().temp_size_in_bytes for c in (0, 8)}
  logits_bytes = 4 * 256 * 4096 * 4
  assert temp[0] - temp[8] > 0.5 * logits_bytes, temp


def test_loss_chunks_train_through_the_loop_and_accuracy_only_on_logged_steps(tmp_path):
  """A chunked run's losses equal the whole-logits run's. The training step's program holds no argmax over the
  vocabulary (a variadic reduce in the HLO); the logged steps' own forward pass does, and gives the accuracy the
  step would have (grad accumulation's micro-batches, dropout and all), before the update; every logged row has
  its accuracy."""
  import re
  rows = {}
  for chunks in (0, 4):
    config = tiny_config('gpt', num_train_steps=6, log_every_steps=3, loss_chunks=chunks, **GPT_TINY)
    loop.train_and_evaluate(config, str(tmp_path / str(chunks)))
    rows[chunks] = [json.loads(line) for line in open(tmp_path / str(chunks) / 'metrics.jsonl')]
  train = {c: [r for r in rows[c] if r['split'] == 'train'] for c in rows}
  assert [r['step'] for r in train[4]] == [3, 6] and all('accuracy' in r for r in train[4])
  np.testing.assert_allclose([r['loss'] for r in train[4]], [r['loss'] for r in train[0]], rtol=1e-4)
  np.testing.assert_allclose([r['accuracy'] for r in train[4]], [r['accuracy'] for r in train[0]], atol=1e-3)

  data = registry.load(config.dataset, 'train', None)
  exp = build_experiment(config, data.info)
  state = exp.init_state()
  batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=16, seed=0)), exp.mesh)
  argmaxes = {name: len(re.findall(r'= \([^)]*\) reduce\(', fn.lower(state, batch, np.int32(0), None).compile(
  ).as_text())) for name, fn in (('train', exp.train_step()), ('logged', exp.logged_metrics()))}
  assert argmaxes == {'train': 0, 'logged': 1}
  for steps in (1, 2):   # the accuracy train_step itself computes (dropout on), before the update
    with config.unlocked():
      config.grad_accum_steps, config.model.dropout_rate = steps, 0.3
    exp = build_experiment(config, data.info)
    state = exp.init_state()
    want = exp.task.train_step(state, batch, exp.step_rng(np.int32(4)))[1]['accuracy']
    got = exp.logged_metrics()(state, batch, np.int32(4), None)['accuracy']
    assert float(got) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize('family', ['gpt_distilled', 'lstm'])
def test_loss_chunks_refuse_what_needs_the_whole_logits(family):
  """A teacher compares whole logits; the LSTM has no output layer to call apart."""
  from model_zoo.errors import UserError
  config = tiny_config('gpt', **GPT_TINY) if family == 'gpt_distilled' else tiny_config('lstm', batch_size=16)
  with config.unlocked():
    config.loss_chunks = 4
    config.distill.teacher = '/a/teacher' if family == 'gpt_distilled' else ''
  data = registry.load(config.dataset, 'train', None)
  with pytest.raises(UserError, match='config.loss_chunks=4'):
    build_experiment(config, data.info)
