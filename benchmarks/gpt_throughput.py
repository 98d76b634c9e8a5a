"""GPT train-step throughput: tokens/s, model FLOP/s in two conventions, and MFU per device.

  python benchmarks/gpt_throughput.py                                  # CPU: tiny and small, XLA attention
  python benchmarks/gpt_throughput.py --sizes=124m --dtype=bfloat16 --impls=xla,cudnn --batch_per_device=16 \
      --gpu_flags --out=/tmp/gpt_gpu                                   # a GPU: ~5 minutes, everything in --out

Each row is one preset, attention implementation and attention path, run through the task's real jitted train
step (forward, backward, AdamW) on random tokens, data parallel over every device:
  packed  rows of several documents (segment ids: causal attention within each document), what training feeds;
  single  rows of one document (no segment ids: causal attention alone, no mask at all for cuDNN).
Model FLOPs per token, both conventions printed:
  full    6 N + 12 L d T (N: matmul parameters; the attention's logits and weighted sum counted over all T x T
          pairs): PaLM's MFU, and model_zoo's (protocol.flops_per_example, counted in the traced program);
  causal  6 N + 6 L d T: half of the attention, what a causal mask leaves (MaxText's convention).
MFU is per device: the achieved FLOP/s of one device against one device's peak (the vendor's dense bfloat16 or
float32 figure on a GPU, the measured matmul peak on a CPU), and against the peak measured in this run (the best
n x n x n matmul). Writes <out>/gpt_throughput_<platform>.json and .md. Not a test.
"""
import argparse
import os
import time

import jax
import numpy as np

from common import ROOT, load, write
from model_zoo.data.base import DataInfo
from model_zoo.data.tokenizers import ByteTokenizer
from model_zoo.errors import UserError
from model_zoo.experiment import build_experiment
from model_zoo.models import protocol
from model_zoo.training import perf, sharding
from model_zoo.training.sweep import typed_value


class _Vocab(ByteTokenizer):
  """A tokenizer stand-in with the preset's vocabulary size (the benchmark feeds random ids)."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def batch_of(config, path: str, rng) -> dict:
  """A batch of random tokens: `packed` rows hold documents of 1/8 to 1/2 of a row each, `single` rows one."""
  v, t, b = config.dataset.vocab_size, config.dataset.seq_len, config.batch_size
  batch = {'inputs': rng.integers(3, v, (b, t), dtype=np.int32), 'targets': rng.integers(3, v, (b, t), dtype=np.int32),
           'weights': np.ones((b, t), np.float32)}
  if path == 'single':
    batch['positions'] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return batch
  segments = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for row in range(b):
    start, doc = 0, 1
    while start < t:
      length = min(int(rng.integers(t // 8, t // 2 + 1)), t - start)
      segments[row, start:start + length], positions[row, start:start + length] = doc, np.arange(length)
      start, doc = start + length, doc + 1
  return {**batch, 'segment_ids': segments, 'positions': positions}


def measure(config, size: str, path: str, steps: int) -> dict:
  rng = np.random.default_rng(0)
  batch = batch_of(config, path, rng)
  example = {k: x[0] for k, x in batch.items()}
  example.setdefault('segment_ids', np.ones_like(example['inputs']))   # the task's init needs a full example
  exp = build_experiment(config, DataInfo(example, tokenizer=_Vocab(config.dataset.vocab_size)))
  state = exp.init_state()
  step = exp.train_step()   # as training runs it (no accuracy: Task.logged_only)
  batch = sharding.to_global(batch, exp.mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch, np.int32(0), None)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, np.int32(i + 1), None)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  sec = float(np.median(times))
  m = config.model
  tokens = config.batch_size * config.dataset.seq_len
  full = exp.task.flops_per_token(state)   # 6 N + 12 L d T, counted in the traced program
  causal = full - 6 * m.num_layers * m.d_model * config.dataset.seq_len
  n = jax.device_count()
  return {'size': size, 'dtype': m.dtype, 'attention_impl': m.attention_impl or 'xla', 'path': path,
          'scan_layers': m.scan_layers, 'remat_policy': m.remat_policy, 'devices': n,
          'batch_size': config.batch_size, 'grad_accum_steps': config.grad_accum_steps,
          'seq_len': config.dataset.seq_len,
          'params': protocol.param_count(state.params), 'first_step_s': first, 'step_s': sec,
          'tokens_per_s': tokens / sec, 'tokens_per_s_per_device': tokens / sec / n,
          'flops_per_token_full': full, 'flops_per_token_causal': causal,
          'tflops_per_device_full': full * tokens / sec / n / 1e12,
          'tflops_per_device_causal': causal * tokens / sec / n / 1e12}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='tiny,small', help='presets of configs/gpt.py')
  parser.add_argument('--dtype', default='', help='model.dtype (float32, bfloat16); the preset\'s if empty')
  parser.add_argument('--impls', default='', help="attention implementations: xla,cudnn (default: xla, and cudnn "
                                                  "too on a GPU)")
  parser.add_argument('--paths', default='packed,single', help='attention paths: packed,single')
  parser.add_argument('--batch_per_device', type=int, default=0, help="rows per device, all at once (the preset's "
                                                                     "batch and per_device_batch_size if 0)")
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--set', action='append', default=[], help='a config override key=value, typed as the field '
                                                                 '(e.g. model.remat_policy=dots); repeatable')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'), help='output directory')
  parser.add_argument('--gpu_flags', action='store_true', help="XLA's GPU performance options, as train.py "
                                                               "--gpu_flags (model_zoo.training.perf.GPU_XLA_FLAGS)")
  args = parser.parse_args()
  if args.gpu_flags:
    perf.use_gpu_xla_flags()
  device = jax.devices()[0]
  impls = args.impls.split(',') if args.impls else ['xla'] + (['cudnn'] if device.platform == 'gpu' else [])
  probe = (1024, 2048, 4096) if device.platform == 'cpu' else (4096, 8192)
  measured = {d: perf.measured_matmul_peak(d, sizes=probe, repeats=5) for d in ('float32', 'bfloat16')}
  # A GPU's dense peak from the vendor's table; on a CPU the matmul peak measured here (fake CPU devices share it).
  per_device_peak = lambda dtype: measured[dtype] if device.platform == 'cpu' else (
      perf.peak_flops(dtype) / jax.device_count())
  rows = []
  for size in args.sizes.split(','):
    for impl in impls:
      for path in args.paths.split(','):
        config = load(f'gpt.py:size={size}', {})
        for key, text in [kv.split('=', 1) for kv in args.set] + (
            [('model.dtype', args.dtype)] if args.dtype else []) + [('model.attention_impl', impl)] + (
            [('batch_size', str(args.batch_per_device * jax.device_count())),
             ('per_device_batch_size', str(args.batch_per_device))] if args.batch_per_device else []):
          *parents, leaf = key.split('.')
          node = config
          for p in parents:
            node = node[p]
          node[leaf] = typed_value(node[leaf], text, key)
        try:
          row = measure(config, size, path, args.steps)
        except UserError as e:
          print(f'{size} {impl} {path}: skipped: {e}', flush=True)
          continue
        peak = per_device_peak(row['dtype'])
        row.update(peak_tflops_per_device=peak / 1e12, measured_peak_tflops=measured[row['dtype']] / 1e12,
                   mfu_full=row['tflops_per_device_full'] * 1e12 / peak,
                   mfu_causal=row['tflops_per_device_causal'] * 1e12 / peak,
                   share_of_measured_peak_full=row['tflops_per_device_full'] * 1e12 / measured[row['dtype']])
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
  header = ('| preset | dtype | attention | path | devices | batch x seq | params | tokens/s/device | '
            'TFLOP/s/device full (causal) | MFU full (causal) | share of measured peak | first step s |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for r in rows:
    lines.append(f'| {r["size"]} | {r["dtype"]} | {r["attention_impl"]} | {r["path"]} | {r["devices"]} | '
                 f'{r["batch_size"]} x {r["seq_len"]} | {r["params"] / 1e6:.1f}M | {r["tokens_per_s_per_device"]:,.0f} | '
                 f'{r["tflops_per_device_full"]:.3f} ({r["tflops_per_device_causal"]:.3f}) | '
                 f'{r["mfu_full"]:.3f} ({r["mfu_causal"]:.3f}) | {r["share_of_measured_peak_full"]:.3f} | '
                 f'{r["first_step_s"]:.1f} |')
  os.makedirs(args.out, exist_ok=True)
  write(os.path.join(args.out, f'gpt_throughput_{device.platform}'),
        {'device': device.device_kind, 'measured_matmul_peak_tflops': {k: v / 1e12 for k, v in measured.items()},
         'rows': rows}, '\n'.join(lines))


if __name__ == '__main__':
  main()
