"""GPT train-step throughput: tokens/s, achieved FLOP/s, and its share of the device's matmul peak.

  python benchmarks/gpt_throughput.py --sizes=tiny,small            # CPU
  python benchmarks/gpt_throughput.py --sizes=124m --dtype=bfloat16 # GPU

The peak is measured in the same run (the best of large square matmuls, float32 and bfloat16);
model FLOPs are 6 N + 12 L d T per token, counted by model_zoo.models.protocol.flops_per_example.
Writes benchmarks/results/gpt_throughput_<platform>.json and prints a table. Not a test.
"""
import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from model_zoo import config as config_lib
from model_zoo.data.base import DataInfo
from model_zoo.data.tokenizers import ByteTokenizer
from model_zoo.models import protocol
from model_zoo.tasks.language_modeling import LanguageModelingTask
from model_zoo.training import perf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Vocab(ByteTokenizer):
  """A tokenizer stand-in with the preset's vocabulary size (the benchmark feeds random ids)."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def gpt_config(size: str, overrides: dict):
  config = config_lib.load(os.path.join(ROOT, 'configs', f'gpt.py:size={size}'))
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return config


def measure(size: str, overrides: dict, steps: int) -> dict:
  config = gpt_config(size, overrides)
  v, t, b = config.dataset.vocab_size, config.dataset.seq_len, config.batch_size
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(3, v, (b, t), dtype=np.int32), 'targets': rng.integers(3, v, (b, t), dtype=np.int32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           'segment_ids': np.ones((b, t), np.int32), 'weights': np.ones((b, t), np.float32)}
  task = LanguageModelingTask(config, DataInfo({k: x[0] for k, x in batch.items()}, tokenizer=_Vocab(v)))
  batch = jax.device_put(batch)
  state = jax.jit(lambda: nn.unbox(task.init_state(jax.random.key(0), batch)))()
  step = jax.jit(task.train_step, donate_argnums=0)
  compile_start = time.perf_counter()
  state, metrics = step(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - compile_start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(i + 1))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  sec = float(np.median(times))
  flops = task.flops_per_token(state) * b * t
  return {'size': size, 'dtype': config.model.dtype, 'batch_size': b, 'seq_len': t,
          'params': protocol.param_count(state.params),
          'step_s': sec, 'first_step_s': compile_s, 'tokens_per_s': b * t / sec, 'model_flops_per_step': float(flops),
          'achieved_tflops': float(flops / sec / 1e12)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='tiny,small')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--set', action='append', default=[], help='config override key=value, e.g. model.dtype=bfloat16')
  args = parser.parse_args()
  overrides = dict(kv.split('=', 1) for kv in args.set)
  device = jax.devices()[0]
  sizes = (1024, 2048, 4096) if device.platform == 'cpu' else (4096, 8192)
  peaks = {dtype: perf.measured_matmul_peak(dtype, sizes=sizes, repeats=5) for dtype in ('float32', 'bfloat16')}
  rows = []
  for size in args.sizes.split(','):
    row = measure(size, overrides, args.steps)
    row['measured_peak_tflops'] = peaks[row['dtype']] / 1e12
    row['share_of_measured_peak'] = row['achieved_tflops'] * 1e12 / peaks[row['dtype']]
    if device.platform == 'gpu':
      row['mfu_vs_spec_peak'] = row['achieved_tflops'] * 1e12 / perf.peak_flops(row['dtype'])
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = {'device': device.device_kind, 'platform': device.platform, 'devices': jax.device_count(),
            'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(), 'jax': jax.__version__,
            'measured_matmul_peak_tflops': {k: v / 1e12 for k, v in peaks.items()}, 'overrides': overrides,
            'rows': rows}
  os.makedirs(os.path.join(ROOT, 'benchmarks', 'results'), exist_ok=True)
  path = os.path.join(ROOT, 'benchmarks', 'results', f'gpt_throughput_{device.platform}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'\n{device.device_kind} x{jax.device_count()}, measured matmul peak: '
        + ', '.join(f'{k} {v / 1e12:.3f} TFLOP/s' for k, v in peaks.items()))
  print(f'{"size":>6} {"dtype":>9} {"params":>8} {"tokens/s":>10} {"TFLOP/s":>8} {"share of peak":>13}')
  for r in rows:
    print(f'{r["size"]:>6} {r["dtype"]:>9} {r["params"] / 1e6:>7.1f}M {r["tokens_per_s"]:>10.0f} '
          f'{r["achieved_tflops"]:>8.3f} {r["share_of_measured_peak"]:>13.3f}')
  print(f'written to {path}')


if __name__ == '__main__':
  main()
