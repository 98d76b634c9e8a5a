"""The SavedModel export (model_zoo/transfer/savedmodel.py), where TensorFlow is installed (pip install -e
'.[tf]'): TF loads it and each signature computes what the model does, at a batch size it was not verified on;
a decoder generates through its prefill and decode_step signatures. Without TensorFlow, one clear line."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from helpers import family_config, family_data
from model_zoo.errors import UserError
from model_zoo.experiment import build_experiment
from model_zoo.workdir import Workdir

HAS_TF = importlib.util.find_spec('tensorflow') is not None


def _build(name):
  config = family_config(name)
  data = family_data(config)
  exp = build_experiment(config, data.info)
  return config, data, exp, exp.init_state()


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed (pip install -e '.[tf]')")
@pytest.mark.parametrize('name', ['cnn', 'vae', 'gpt'])
def test_tensorflow_loads_the_export_and_runs_the_model(tmp_path, name):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from model_zoo.transfer import savedmodel, stablehlo  # pylint: disable=g-import-not-at-top
  config, data, exp, state = _build(name)
  out = str(tmp_path / 'sm')
  savedmodel.export(config, exp.task, exp.task.variables(state), data, Workdir(str(tmp_path / 'wd')), out)
  loaded = tf.saved_model.load(out)
  functions = exp.task.serving()
  variables = jax.device_get(exp.task.variables(state))
  if name == 'gpt':   # prefill two prompts, then two decode steps fed the greedy tokens
    rows = [np.asarray(data.preprocess(data.source[i])['inputs']) for i in (3, 4)]
    inputs = {'tokens': np.stack([rows[0][:7], np.where(np.arange(7) < 3, rows[1][:7], 0)]).astype(np.int32),
              'lengths': np.array([7, 3], np.int32)}
    keys = [('prefill', 'serving_default', inputs)]   # a model's first function is serving_default
  elif name == 'vae':
    keys = [('encode', 'serving_default', {'image': np.stack([data.preprocess(data.source[i])['image']
                                                               for i in range(3)])}),
            ('decode', 'decode', {'latent': np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)})]
  else:
    keys = [('model', 'serving_default', {'image': np.stack([data.preprocess(data.source[i])['image']
                                                              for i in range(3)])})]
  for fn, key, inputs in keys:
    for _ in range(3 if name == 'gpt' else 1):
      serving = functions[fn]
      want = jax.device_get(jax.jit(serving.fn)(serving.weights_of(variables), inputs))
      got = savedmodel.run(loaded, key, inputs)
      names, leaves, _ = stablehlo.flatten(want)
      assert set(got) == {savedmodel.tf_name(n) for n in names}
      for n, w in zip(names, leaves):
        np.testing.assert_allclose(got[savedmodel.tf_name(n)], w, rtol=1e-4, atol=1e-5, err_msg=f'{fn}/{n}')
      if name == 'gpt':   # the next call: one decode step from this cache
        fn = key = 'decode_step'
        inputs = {'cache': want['cache'], 'tokens': np.argmax(want['logits'], -1).astype(np.int32),
                  'positions': want['positions']}
  assert os.path.exists(os.path.join(out, 'saved_model.pb'))


@pytest.mark.skipif(HAS_TF, reason='TensorFlow is installed')
def test_without_tensorflow_savedmodel_is_one_line_and_writes_nothing(tmp_path):
  from model_zoo.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"--format=savedmodel needs TensorFlow .*pip install -e '.\[tf\]'"):
    evaluate.export(family_config('mlp'), str(tmp_path / 'wd'), str(tmp_path / 'sm'), format='savedmodel')
  assert os.listdir(tmp_path) == []
