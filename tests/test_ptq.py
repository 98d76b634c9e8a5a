"""eval.py --quantize on trained work directories (model_zoo/compression/ptq.py): eval-<SCHEME>.json and the
quantized checkpoint it reuses, GPTQ's record, export, QAT, sample and translate, and the mistakes. The
arithmetic of quantization itself is tests/test_quantization.py's."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import bytes_by_hand, family_config, tiny_config
from model_zoo.compression import settings
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.experiment import check
from model_zoo.training import loop
from model_zoo.training.checkpoints import Checkpoints


@pytest.fixture(scope='module')
def mlp_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mlp'))
  config = tiny_config('mlp', **{'model.hidden_sizes': (32, 32)})
  loop.train_and_evaluate(config, workdir)
  evaluate.evaluate(config, workdir)
  return config, workdir




@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_eval_quantize_writes_eval_scheme_json_and_a_checkpoint_that_is_reused(mlp_run, scheme, capsys):
  config, workdir = mlp_run
  first = evaluate.evaluate(config, workdir, quantize=scheme)
  assert f'quantized step 30 as {scheme}' in capsys.readouterr().out
  with open(os.path.join(workdir, 'eval.json')) as f:
    float_keys = set(json.load(f))
  with open(os.path.join(workdir, f'eval-{scheme}.json')) as f:
    saved = json.load(f)
  assert set(saved) == float_keys | {'weight_bytes', 'float_weight_bytes'}
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  params = ckpt.restore_tree(30)['params']
  ckpt.close()
  assert (saved['weight_bytes'], saved['float_weight_bytes']) == bytes_by_hand(params, scheme)
  with open(os.path.join(workdir, 'quantized', scheme, '30', 'metadata', 'metadata')) as f:
    meta = json.load(f)
  assert meta['scheme'] == scheme and meta['step'] == 30 and meta['quantization']['weight_dtype'] == scheme
  assert os.path.exists(os.path.join(workdir, f'confusion_matrix-{scheme}.png'))
  again = evaluate.evaluate(config, workdir, quantize=scheme)
  assert f'using the {scheme} checkpoint of step 30' in capsys.readouterr().out
  assert again == first


def test_gptq_records_its_calibration_and_export_writes_packed_int4(mlp_run, tmp_path):
  config, workdir = mlp_run
  evaluate.export(config, workdir, str(tmp_path / 'export'), quantize='int4_gptq')
  with open(os.path.join(workdir, 'quantized', 'int4_gptq', '30', 'metadata', 'metadata')) as f:
    meta = json.load(f)
  assert meta['calibration'] == {'split': 'train', 'batches': 8, 'batch_size': 32, 'seed': 0}
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = load_file(str(tmp_path / 'export' / 'model.safetensors'))
  assert weights['block_0/kernel/qvalue'].dtype == np.uint8 and weights['block_0/kernel/qvalue'].size == 64 * 32 // 2
  assert weights['block_0/kernel/scale'].shape == (1, 32) and weights['cls_head/kernel'].dtype == np.float32
  with open(tmp_path / 'export' / 'config.json') as f:
    assert json.load(f)['quantization']['weight_dtype'] == 'int4'


def test_stablehlo_export_of_int4_takes_the_packed_weights_and_computes_the_quantized_model(mlp_run, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from model_zoo.data import registry  # pylint: disable=g-import-not-at-top
  from model_zoo.transfer import stablehlo  # pylint: disable=g-import-not-at-top
  config, workdir = mlp_run
  out = str(tmp_path / 'hlo')
  evaluate.export(config, workdir, out, quantize='int4', format='stablehlo')
  weights = load_file(os.path.join(out, 'weights.safetensors'))
  assert weights['params/block_0/kernel/qvalue'].dtype == np.uint8
  assert weights['params/block_0/kernel/qvalue'].size == 64 * 32 // 2
  test = registry.load(config.dataset, 'test')
  images = np.stack([test.preprocess(test.source[i])['image'] for i in range(20, 26)])
  _, exp, _, state, _ = evaluate._restore(config, workdir, None, 'int4')  # pylint: disable=protected-access
  want = jax.nn.softmax(exp.task.predict(state, {'image': images}), -1)
  np.testing.assert_allclose(stablehlo.run(out, 'model', weights, {'image': images})['probabilities'], want,
                             rtol=1e-4, atol=1e-6)


def test_qat_resumes_exactly_and_ptq_of_it_computes_what_it_evaluated(mlp_run, tmp_path):
  _, float_workdir = mlp_run
  qat = lambda steps: tiny_config('mlp', **{'model.hidden_sizes': (32, 32), 'init_from': float_workdir,
                                            'quantization.mode': 'qat', 'num_train_steps': steps,
                                            'optimizer.warmup_steps': 0, 'optimizer.schedule': 'constant',
                                            'eval_every_steps': 8, 'checkpoint_every_steps': 4})
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  loop.train_and_evaluate(qat(8), straight)
  loop.train_and_evaluate(qat(4), resumed)
  loop.train_and_evaluate(qat(8), resumed)
  states = []
  for w in (straight, resumed):
    ckpt = Checkpoints(os.path.join(w, 'checkpoints'))
    states.append(ckpt.restore_tree(8))
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, *states)
  qat_metrics = evaluate.evaluate(qat(8), straight)                 # the fake-quantized forward pass
  ptq_metrics = evaluate.evaluate(qat(8), straight, quantize='int8')  # real int8 weights
  for k, v in qat_metrics.items():
    np.testing.assert_allclose(ptq_metrics[k], v, rtol=1e-5, err_msg=k)


def test_quantization_mistakes_are_one_line_and_write_nothing(mlp_run, tmp_path):
  config, workdir = mlp_run
  files = lambda: sorted(os.path.join(r, f) for r, _, fs in os.walk(workdir) for f in fs)
  before = files()
  with pytest.raises(UserError, match='no checkpoint'):
    evaluate.evaluate(config, str(tmp_path / 'empty'), quantize='int8')
  assert not os.path.exists(tmp_path / 'empty')
  with pytest.raises(UserError, match="--quantize='int3' is not one of"):
    settings.with_scheme(config, 'int3')
  bad = config.copy_and_resolve_references()
  with bad.unlocked():
    bad.quantization.modules = 'encoder/.*'
  with pytest.raises(UserError, match="modules='encoder/.*' matches no dense or convolution layer"):
    evaluate.evaluate(bad, workdir, quantize='int8')
  with bad.unlocked():
    bad.quantization.modules, bad.quantization.tile_size = settings.DEFAULT_MODULES, 5
  with pytest.raises(UserError, match='cannot be applied to this model'):
    evaluate.evaluate(bad, workdir, quantize='int4')
  assert files() == before
  for changes, message in [({'act_dtype': 'int4'}, "act_dtype='int4' is not one of none, int8"),
                            ({'weight_dtype': 'int3'}, "weight_dtype='int3' is not one of int8, int4"),
                            ({'act_dtype': 'int8', 'weight_dtype': 'int4'}, "needs weight_dtype='int8'"),
                            ({'calibration': 'gptq', 'act_dtype': 'int8'}, 'rounds weights only'),
                            ({'mode': 'qat', 'calibration': 'gptq'}, 'post-training method'),
                            ({'mode': 'qat'}, 'set --config.init_from'),
                            ({'mode': 'int8'}, "mode='int8' is not one of none, ptq, qat"),
                            ({'tile_size': -1}, 'tile_size must be an integer >= 0'),
                            ({'modules': '(unclosed'}, 'is not a regular expression')]:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.quantization.update(**changes)
    with pytest.raises(UserError, match=message.replace('(', r'\(')):
      check(c)


def test_sample_and_translate_run_the_quantized_model(tmp_path, capsys):
  gpt = family_config('gpt', num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=2,
                      **{'optimizer.warmup_steps': 0, 'model.num_layers': 1},
                      **{'quantization.calibration_batches': 2})
  loop.train_and_evaluate(gpt, str(tmp_path / 'gpt'))
  texts = evaluate.sample(gpt, str(tmp_path / 'gpt'), ['The ', 'def '], max_new_tokens=4, temperature=0.0,
                          quantize='int4_gptq')
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  assert 'quantized step 2 as int4_gptq' in capsys.readouterr().out
  mt = family_config('transformer', num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                     log_every_steps=2, **{'optimizer.warmup_steps': 0, 'decode.beam_size': 1, 'decode.max_len': 8,
                                           'model.num_encoder_layers': 1, 'model.num_decoder_layers': 1})
  loop.train_and_evaluate(mt, str(tmp_path / 'mt'))
  assert len(evaluate.translate(mt, str(tmp_path / 'mt'), ['three hundred and five'], quantize='int8')) == 1
  assert 'quantized step 2 as int8' in capsys.readouterr().out
