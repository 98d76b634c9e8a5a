"""The StableHLO export (model_zoo/transfer/stablehlo.py) of every family: what it writes runs, from the files
alone and at a batch size it was not verified on, as the model does in eval; the decoders' prefill and decode
step generate as the model computes without a cache; a wrong export is refused and leaves nothing behind."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import FAMILIES as FAMILY_SHAPES
from helpers import family_config, family_data, tiny_config
from model_zoo.errors import UserError
from model_zoo.experiment import build_experiment
from model_zoo.transfer import stablehlo
from model_zoo.workdir import Workdir


def _build(name, **overrides):
  if name == 'bert_classifier':   # the BERT family's fine-tuning config, at the tiny shape
    shape = {k: v for k, v in FAMILY_SHAPES['bert'][1].items() if k.startswith(('model.', 'dataset.'))}
    config = tiny_config('bert_finetune', **shape, **overrides)
  else:
    config = family_config(name, **overrides)
  data = family_data(config)
  exp = build_experiment(config, data.info)
  return config, data, exp, exp.init_state()


def _examples(data, n, start=10):
  """n eval-like examples (of the training split, from `start`: not the reference inputs)."""
  examples = [data.preprocess(data.source[i]) for i in range(start, start + n)]
  return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


def _expected(name, exp, state, inputs):
  """What the model computes on `inputs` through the task's own eval paths (not its serving functions)."""
  task = exp.task
  if name in ('autoencoder', 'vae'):
    return {'encode': {'latent': task.encode(state.params, inputs['image'])},
            'decode': {'image': task.decode(state.params, inputs['latent'])}}
  if name == 'dcgan':
    g = state['generator']
    return {'generate': {'image': task.generate(g.params, g.model_state, inputs['latent'], train=False)[0]}}
  batch = dict(inputs)
  if name == 'bert':   # the masked-LM head on every position
    b, t = batch['inputs'].shape
    batch['mlm_positions'] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return {'model': {'logits': task.predict(state, batch)}}
  logits = task.predict(state, batch)
  return {'model': {'probabilities': jax.nn.softmax(logits, -1), 'label': jnp.argmax(logits, -1)}}


def inputs_and_expected(name, config, data, exp, state):
  """Three examples the export was not verified on (and latents), and what the model computes on them."""
  inputs = _examples(data, 3)
  inputs['latent'] = np.random.default_rng(1).standard_normal((3, config.model.get('latent_dim', 1))).astype(
      np.float32)
  return inputs, _expected(name, exp, state, inputs)


CPU = ('cpu',)   # lowered for CUDA too by default: tests/test_cli.py's export checks that
FAMILIES = ['mlp', 'cnn', 'resnet', 'vit', 'mixer', 'rnn_classifier', 'bert', 'bert_classifier', 'autoencoder',
            'vae', 'dcgan']


@pytest.mark.parametrize('name', FAMILIES)
def test_every_family_exports_and_runs_from_the_files_alone(tmp_path, name):
  config, data, exp, state = _build(name)
  out = str(tmp_path / 'export')
  stablehlo.export(config, exp.task, exp.task.variables(state), data, Workdir(str(tmp_path / 'wd')), out, platforms=CPU)
  with open(os.path.join(out, 'signature.json')) as f:
    signature = json.load(f)
  weights = load_file(os.path.join(out, 'weights.safetensors'))
  reference = np.load(os.path.join(out, 'reference_io.npz'))
  inputs, expected = inputs_and_expected(name, config, data, exp, state)
  assert set(signature['functions']) == set(expected)
  for fn, want in expected.items():
    spec = signature['functions'][fn]
    assert os.path.exists(os.path.join(out, spec['file']))
    assert all(s['shape'][0] == 'batch' for s in {**spec['inputs'], **spec['outputs']}.values())
    assert spec['arguments'][-len(spec['inputs']):] == sorted(spec['inputs'])
    assert set(spec['arguments'][:-len(spec['inputs'])]) <= set(weights)
    # Batch 3: not the size it was verified on; inputs it has not seen.
    got = stablehlo.run(out, fn, weights, {k: inputs[k] for k in spec['inputs']})
    assert set(got) == set(want) == set(spec['outputs'])
    for key in want:
      np.testing.assert_allclose(got[key], np.asarray(want[key]), rtol=1e-4, atol=1e-5, err_msg=f'{fn}/{key}')
      ref_in = {k: reference[f'{fn}/inputs/{k}'] for k in spec['inputs']}
      np.testing.assert_allclose(stablehlo.run(out, fn, weights, ref_in)[key], reference[f'{fn}/outputs/{key}'],
                                 rtol=1e-4, atol=1e-5)
  if name == 'dcgan':   # the generator alone
    assert not any('discriminator' in k for k in weights)
  if name == 'bert_classifier':
    assert signature['labels'] == list(data.class_names) and 'pad_id' in signature['preprocessing']


def test_an_export_that_does_not_reproduce_the_model_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
  config, data, exp, state = _build('mlp')
  real = stablehlo.run
  monkeypatch.setattr(stablehlo, 'run', lambda *a: {k: v + 1e-3 if k == 'probabilities' else v
                                                    for k, v in real(*a).items()})
  out = tmp_path / 'export'
  with pytest.raises(UserError, match="StableHLO export of model does not reproduce the model: its 'probabilities'"):
    stablehlo.export(config, exp.task, exp.task.variables(state), data, Workdir(str(tmp_path / 'wd')), str(out), platforms=CPU)
  assert os.listdir(tmp_path) == []


def test_a_used_output_directory_is_refused_and_kept(tmp_path):
  config, data, exp, state = _build('mlp')
  (tmp_path / 'used').mkdir()
  (tmp_path / 'used' / 'keep.txt').write_text('x')
  with pytest.raises(UserError, match='exists and is not empty'):
    stablehlo.export(config, exp.task, exp.task.variables(state), data, Workdir(str(tmp_path / 'wd')),
                     str(tmp_path / 'used'))
  assert os.listdir(tmp_path / 'used') == ['keep.txt']


def _greedy(out, weights, first, steps):
  """Greedy decoding from the export's files: prefill, then `steps` decode steps fed their own argmax.
  -> (tokens [B, steps + 1], logits [B, steps + 1, V])."""
  step = stablehlo.run(out, 'prefill', weights, first)
  tokens, logits = [], []
  for _ in range(steps + 1):
    logits.append(step['logits'])
    tokens.append(np.argmax(step['logits'], -1).astype(np.int32))
    if len(tokens) > steps:
      break
    state = {k: v for k, v in step.items() if k not in ('logits', 'positions')}
    step = {**{k: v for k, v in step.items() if k in ('encoded', 'source_segments')},
            **stablehlo.run(out, 'decode_step', weights, {**state, 'tokens': tokens[-1],
                                                           'positions': step['positions']})}
  return np.stack(tokens, 1), np.stack(logits, 1)


@pytest.mark.parametrize('name', ['gpt', 'rnn_lm', 'transformer'])
def test_decoders_generate_from_the_files_as_the_model_computes_without_a_cache(tmp_path, name):
  """prefill + decode_step, run from the files with the cache passed in and out, give at every step the logits
  the model computes on the whole sequence at once (teacher forcing, no cache), for prompts of 9, 4 and 1
  tokens in one batch."""
  config, data, exp, state = _build(name)
  out = str(tmp_path / 'export')
  stablehlo.export(config, exp.task, exp.task.variables(state), data, Workdir(str(tmp_path / 'wd')), out, platforms=CPU)
  with open(os.path.join(out, 'signature.json')) as f:
    signature = json.load(f)
  assert set(signature['functions']) == {'prefill', 'decode_step'}
  weights = load_file(os.path.join(out, 'weights.safetensors'))
  check_decoder(name, data, exp, state, lambda first, steps: _greedy(out, weights, first, steps), steps=5)


def check_decoder(name, data, exp, state, greedy, steps):
  """`greedy(first inputs, steps)` -> (tokens [B, steps + 1], logits [B, steps + 1, V]) gives at every step the
  logits the model computes on the whole sequence at once (teacher forcing, no cache): three Transformer
  sources, or prompts of 9, 4 and 1 tokens in one batch."""
  params = state.params
  apply = jax.jit(lambda *a: exp.task.model.apply({'params': params}, *a, train=False))
  if name == 'transformer':
    tok = data.tokenizer
    ids = tok.encode_batch([src for src, _ in list(data.raw)[20:23]])
    source = np.zeros((3, max(map(len, ids))), np.int32)
    for row, x in enumerate(ids):
      source[row, :len(x)] = x
    tokens, logits = greedy({'source': source}, steps)
    for row in range(3):
      src = source[row:row + 1, :len(ids[row])]
      tgt_in = np.concatenate([[[tok.bos_id]], tokens[row:row + 1, :steps]], 1).astype(np.int32)
      want = apply(src, tgt_in)
      np.testing.assert_allclose(logits[row], want[0], rtol=1e-4, atol=1e-4)
    return
  rows = [np.asarray(data.preprocess(data.source[i])['inputs']) for i in (10, 11, 12)]
  lengths = np.array([9, 4, 1], np.int32)
  prompts = np.stack([np.where(np.arange(9) < n, r[:9], 0) for r, n in zip(rows, lengths)]).astype(np.int32)
  tokens, logits = greedy({'tokens': prompts, 'lengths': lengths}, steps)
  for row, n in enumerate(lengths):
    sequence = np.concatenate([prompts[row, :n], tokens[row, :steps]])[None].astype(np.int32)
    want = apply(sequence)[0, n - 1:]
    np.testing.assert_allclose(logits[row], want, rtol=1e-4, atol=1e-4)
