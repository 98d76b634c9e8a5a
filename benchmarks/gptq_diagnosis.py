"""Why int4 GPTQ does not beat round-to-nearest on the GPT default: GPTQ's own objective per layer, and
nats/byte under other GPTQ settings, on a trained GPT default work directory.

  python benchmarks/gptq_diagnosis.py [--workdir=/tmp/model_zoo_quantization/gpt]

(`benchmarks/quantization.py --rows=gpt` trains that work directory.) For each quantized layer:
||X W - X Q||^2 = tr((W - Q)^T H (W - Q)) with H = X^T X summed over 2 calibration batches, for Q rounded
to nearest and by GPTQ. Then eval nats/byte of: float, int4 round-to-nearest, GPTQ with 8 and 64 calibration
batches, damping 0.1 and 1.0 (8 batches), and GPTQ calibrated on the eval split itself (a diagnosis, not a
method); and how far each int4 model is from the float one (KL of the next-token distributions), with the
paired difference of nats/byte and its standard error.
Nothing is written into the work directory; writes benchmarks/results/gptq_diagnosis.json.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model_zoo import config as config_lib  # pylint: disable=wrong-import-position
from model_zoo.compression import ptq, quantization, settings  # pylint: disable=wrong-import-position
from model_zoo.experiment import prepare  # pylint: disable=wrong-import-position
from model_zoo.training import loop  # pylint: disable=wrong-import-position


def _dequantized(params) -> dict:
  is_q = lambda x: isinstance(x, quantization.WithAux)
  flat = traverse_util.flatten_dict(jax.tree.map(
      lambda x: np.asarray(x.array.qvalue, np.float32) * np.asarray(x.array.scale, np.float32) if is_q(x) else None,
      params, is_leaf=is_q))
  return {k: v for k, v in flat.items() if v is not None}


def distance_from_float(run, exp, state, float_vars, eval_data, variants: dict) -> dict:
  """Per quantized model, over the eval split's targets: the mean KL(float || quantized) of the next-token
  distributions (what GPTQ's layer objective aims at), and its nats/byte minus round-to-nearest's with the
  standard error of that paired difference over tokens."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from model_zoo.data import pipeline  # pylint: disable=g-import-not-at-top
  float_predict = jax.jit(run.experiment.task.predict)
  quantized_predict = jax.jit(exp.task.predict)
  states = {k: exp.task.with_variables(exp.abstract_state, {**float_vars, 'params': v}) for k, v in variants.items()}
  token_bytes = np.asarray(run.experiment.task.info.tokenizer.token_bytes())
  nll, kl, weights, total_bytes = {k: [] for k in states}, {k: [] for k in states}, [], 0.0
  for batch in pipeline.eval_batches(eval_data, batch_size=32, process_index=0, process_count=1):
    w = batch['weights'] * batch['mask'][:, None]
    log_p = jax.nn.log_softmax(float_predict(state, batch).astype(jnp.float32))
    for k, qstate in states.items():
      log_q = jax.nn.log_softmax(quantized_predict(qstate, batch).astype(jnp.float32))
      nll[k].append(-np.take_along_axis(np.asarray(log_q), batch['targets'][..., None], -1)[..., 0].ravel())
      kl[k].append(np.asarray(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)).ravel())
    weights.append(w.ravel())
    total_bytes += float((token_bytes[batch['targets']] * w).sum())
  w = np.concatenate(weights)
  out = {}
  base = np.concatenate(nll['int4_round_to_nearest'])
  for k in states:
    diff = (np.concatenate(nll[k]) - base)[w > 0]
    out[k] = {'kl_from_float_per_token': float((np.concatenate(kl[k]) * w).sum() / w.sum()),
              'nats_per_byte_minus_round_to_nearest': float(diff.sum() / total_bytes),
              'standard_error': float(diff.std() * np.sqrt(len(diff)) / total_bytes)}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='/tmp/model_zoo_quantization/gpt')
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'gptq_diagnosis.json'))
  args = parser.parse_args()
  config = config_lib.load(os.path.join(ROOT, 'configs', 'gpt.py'))
  run = prepare(config, args.workdir, [config.dataset.eval_split, config.dataset.train_split], staging=False)
  ckpt = run.experiment.checkpoints(args.workdir)
  step = ckpt.latest_step()
  state = ckpt.restore(step, run.experiment.abstract_state)
  ckpt.close()
  eval_data = run.data[config.dataset.eval_split]
  float_vars = run.experiment.task.variables(state)
  params = float_vars['params']
  qconfig = ptq.inference_config(settings.with_scheme(run.config, 'int4_gptq'))
  exp = ptq.quantized_experiment(qconfig, run.experiment.task.info, run.experiment.mesh)
  abstract = exp.task.variables(exp.abstract_state)['params']
  eval_fn = loop.make_eval_fn(exp)

  def nats_per_byte(qparams):
    qstate = exp.task.with_variables(exp.abstract_state, {**float_vars, 'params': qparams})
    return float(eval_fn(qstate, eval_data)[0]['nats_per_byte'])

  def calibrated(batches, split=None):
    c = qconfig.copy_and_resolve_references()
    with c.unlocked():
      c.quantization.calibration_batches = batches
      c.dataset.train_split = split or c.dataset.train_split
    return ptq._calibrate(run, exp, float_vars, c)[0]  # pylint: disable=protected-access

  out = {'workdir': args.workdir, 'step': step, 'date': time.strftime('%Y-%m-%d'),
         'command': 'python benchmarks/gptq_diagnosis.py ' + ' '.join(sys.argv[1:])}
  rtn = quantization.quantize(params, abstract)
  stats2 = calibrated(2)
  gptq2 = quantization.gptq_quantize(params, abstract, stats2)
  flat_w, flat_h = traverse_util.flatten_dict(jax.device_get(params)), traverse_util.flatten_dict(stats2)
  r, g = _dequantized(rtn), _dequantized(gptq2)
  layers = {}
  for k in r:
    h_key = k[:-1] + (k[-1] + '_gptq', 'sum_of_hessian')
    if h_key not in flat_h:
      continue   # a layer GPTQ does not calibrate (the attention output's 3-d kernel): rounded to nearest
    h = np.asarray(flat_h[h_key], np.float64)
    w = np.asarray(flat_w[k], np.float64).reshape(h.shape[0], -1)
    err = lambda q, w=w, h=h: float(np.trace((w - q.reshape(w.shape)).T @ h @ (w - q.reshape(w.shape))))
    layers['/'.join(k)] = {'round_to_nearest': err(r[k]), 'gptq': err(g[k]), 'ratio': err(g[k]) / err(r[k])}
    print(f'{"/".join(k)}: ||XW - XQ||^2 round-to-nearest {err(r[k]):.4g}, GPTQ {err(g[k]):.4g}', flush=True)
  out['layer_error_2_batches'] = layers
  stats8 = calibrated(8)
  rows = {'float': float(loop.make_eval_fn(run.experiment)(state, eval_data)[0]['nats_per_byte']),
          'int4_round_to_nearest': nats_per_byte(rtn),
          'int4_gptq_8_batches': nats_per_byte(quantization.gptq_quantize(params, abstract, stats8)),
          'int4_gptq_64_batches': nats_per_byte(quantization.gptq_quantize(params, abstract, calibrated(64))),
          'int4_gptq_damping_0.1': nats_per_byte(quantization.gptq_quantize(params, abstract, stats8, damping=0.1)),
          'int4_gptq_damping_1.0': nats_per_byte(quantization.gptq_quantize(params, abstract, stats8, damping=1.0)),
          'int4_gptq_calibrated_on_eval_split': nats_per_byte(quantization.gptq_quantize(
              params, abstract, calibrated(8, config.dataset.eval_split)))}
  out['nats_per_byte'] = rows
  for k, v in rows.items():
    print(f'{k}: {v:.5f} nats/byte', flush=True)
  out['distance_from_float'] = distance_from_float(run, exp, state, float_vars, eval_data, {
      'int4_round_to_nearest': rtn, 'int4_gptq_8_batches': quantization.gptq_quantize(params, abstract, stats8)})
  print(json.dumps(out['distance_from_float'], indent=1), flush=True)
  with open(args.output, 'w') as f:
    json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
