"""Activation sharding: with the constraints at block boundaries, q/k/v, the MLP and the logits, an FSDP step moves
about its weights, not its activations; meshes the model does not divide over are refused before compiling."""
import jax
import numpy as np
import pytest

from helpers import tiny_config
from model_zoo.data import registry
from model_zoo.errors import UserError
from model_zoo.experiment import build_experiment, check
from model_zoo.models import layers
from model_zoo.training import perf, sharding

# Rows of 64 tokens, 64 of them: each step's activations are ~10x the parameters, so gathering them would show.
GPT = {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 4, 'model.d_ff': 64, 'model.max_len': 64,
       'dataset.seq_len': 64, 'dataset.tokenizer': 'bytes', 'dataset.vocab_size': 259, 'batch_size': 64,
       'model.dropout_rate': 0.0, 'mesh.data': 1, 'mesh.fsdp': 8, 'mesh.tensor': 1}


def _collective_bytes(monkeypatch, constrained: bool) -> tuple[int, int]:
  if not constrained:
    monkeypatch.setattr(layers, 'constrain', lambda x, *names: x)
  config = tiny_config('gpt', **GPT)
  data = registry.load(config.dataset, 'train', None)
  exp = build_experiment(config, data.info)
  batch = {k: jax.ShapeDtypeStruct((64, *np.shape(x)), np.asarray(x).dtype, sharding=sharding.batch_sharding(exp.mesh))
           for k, x in data.info.example.items()}
  hlo = exp.train_step().lower(exp.abstract_state, batch, np.int32(0), None).compile().as_text()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(exp.abstract_state.params))
  return sum(n for _, n in perf.collectives(hlo).values()), params


def test_fsdp_moves_weights_not_activations(monkeypatch):
  """Gathering the weights forward and backward and reducing the gradients is ~3x the parameters' bytes."""
  moved, params = _collective_bytes(monkeypatch, constrained=True)
  assert moved <= 3.5 * params, (moved, params)


def test_without_the_constraints_fsdp_moves_activations(monkeypatch):
  """The check above can fail: the same step without the constraints moves many times more."""
  moved, params = _collective_bytes(monkeypatch, constrained=False)
  assert moved > 5 * params, (moved, params)


@pytest.mark.parametrize('key, value, words', [
    ('model.num_heads', 2, ['config.model.num_heads=2', 'config.mesh.tensor=4']),
    ('model.num_kv_heads', 2, ['config.model.num_kv_heads=2', 'config.mesh.tensor=4']),
    ('dataset.vocab_size', 258, ['config.dataset.vocab_size=258', 'config.mesh.tensor=4']),
])
def test_a_mesh_the_model_does_not_divide_over_is_refused(key, value, words):
  config = tiny_config('gpt', **{**GPT, 'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.tensor': 4, 'model.num_heads': 8,
                                 key: value})
  with pytest.raises(UserError) as e:
    check(config)
  assert all(w in str(e.value) for w in words), str(e.value)
