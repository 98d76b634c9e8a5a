"""What the big presets would cost on 8 devices, found by compiling (never running) their train step for 8 fake
CPU devices: per-device state and peak memory, FLOPs per device against the model's, the collectives and their
bytes, and compile time against depth, scanned and unrolled.

  python benchmarks/scale_probe.py                                    # 124m on every mesh, the depth probe
  python benchmarks/scale_probe.py --sizes=124m,350m,1b --meshes=fsdp --depth=''
  python benchmarks/scale_probe.py --sizes=124m,350m,1b --meshes=data --depth='' --per_device
      # what one GPU needs: the state whole, one micro-batch (the preset's per_device_batch_size) at a time

Rows, for each preset and mesh (data, fsdp, tensor):
  state_gb       the train state (parameters, AdamW moments) a device holds;
  peak_gb        XLA's memory_analysis() of the compiled step: arguments + outputs + temporaries - aliased;
  flops_ratio    the compiled program's FLOPs per device (cost_analysis) over the model's training FLOPs per step
                 (6 N + 12 L d T a token, every attention logit counted) divided by the devices: 1.0 means no
                 device repeats another's work (causal blocks make XLA's attention a little cheaper than that);
  collective_gb  the bytes of the results of all-gather, all-reduce, reduce-scatter and all-to-all in the
                 optimized program, per device and step (inside a loop: times its trip count), with the
                 parameter bytes beside them: an FSDP step ideally gathers the weights once forward and once
                 backward and reduce-scatters the gradients once, ~3x the parameter bytes.
Attention is model_zoo's XLA path: logits a block of queries at a time, none kept for the backward pass (it
recomputes them from the saved log-sum-exp), so no [T, S] array outlives a block and no separate no-T x T
estimate is made.
Writes benchmarks/results/scale_probe.{json,md}. Not a test.
"""
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import numpy as np

from common import ROOT, load, write
from model_zoo.data.base import DataInfo
from model_zoo.data.tokenizers import ByteTokenizer
from model_zoo.errors import UserError
from model_zoo.experiment import build_experiment
from model_zoo.training import perf, sharding

MESHES = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (1, 1, 8), 'mixed': (2, 2, 2)}


class _Vocab(ByteTokenizer):

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def probe(size: str, mesh_name: str, overrides: dict, per_device: bool = False) -> dict:
  # The whole batch in one pass, or (per_device) the preset's micro-batches: XLA's cost analysis then counts one
  # micro-batch of the accumulation loop.
  config = load(f'gpt.py:size={size}', {**({} if per_device else {'per_device_batch_size': 0}),
                                        **dict(zip(('mesh.data', 'mesh.fsdp', 'mesh.tensor'), MESHES[mesh_name])),
                                        **overrides})
  v, t, b = config.dataset.vocab_size, config.dataset.seq_len, config.batch_size
  example = {'inputs': np.zeros(t, np.int32), 'targets': np.zeros(t, np.int32), 'positions': np.arange(t, dtype=np.int32),
             'segment_ids': np.ones(t, np.int32), 'weights': np.ones(t, np.float32)}
  exp = build_experiment(config, DataInfo(example, tokenizer=_Vocab(v)))
  batch = {k: jax.ShapeDtypeStruct((b, *x.shape), x.dtype, sharding=sharding.batch_sharding(exp.mesh))
           for k, x in example.items()}
  step = exp.train_step()   # as training runs it (no accuracy: Task.logged_only)
  start = time.perf_counter()
  compiled = step.lower(exp.abstract_state, batch, np.int32(0), None).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state_bytes = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * np.dtype(s.dtype).itemsize
                    for s in jax.tree.leaves(exp.abstract_state))
  param_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(
      exp.abstract_state.params))
  flops_token = exp.task.flops_per_token(exp.abstract_state)
  model_flops = flops_token * b * t
  coll = perf.collectives(compiled.as_text())
  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - \
      memory.alias_size_in_bytes
  m = config.model
  return {'size': size, 'mesh': mesh_name, 'mesh_shape': MESHES[mesh_name], 'layers': m.num_layers,
          'scan_layers': m.scan_layers, 'remat_policy': m.remat_policy, 'dtype': m.dtype,
          'batch': b, 'per_device_batch_size': config.per_device_batch_size,
          'grad_accum_steps': config.grad_accum_steps, 'seq_len': t, 'compile_s': compile_s, 'state_gb': state_bytes / 1e9,
          'peak_gb': peak / 1e9, 'temp_gb': memory.temp_size_in_bytes / 1e9, 'param_gb': param_bytes / 1e9,
          'hlo_flops_per_device': float(cost.get('flops', 0.0)), 'model_flops_per_device': model_flops / 8,
          'flops_ratio': float(cost.get('flops', 0.0)) / (model_flops / 8),
          'collectives': {k: {'count': c, 'gb': n / 1e9} for k, (c, n) in coll.items()},
          'collective_gb': sum(n for _, n in coll.values()) / 1e9}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', default='124m')
  parser.add_argument('--meshes', default='data,fsdp,tensor,mixed')
  parser.add_argument('--set', action='append', default=[], help='config override key=value (a Python literal)')
  parser.add_argument('--depth', default='4,32', help="layer counts of the compile-time probe ('' for none)")
  parser.add_argument('--per_device', action='store_true', help="the presets' per_device_batch_size micro-batches "
                                                                "(gradient accumulation), not the whole batch at once")
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'scale_probe'))
  args = parser.parse_args()
  import ast  # pylint: disable=g-import-not-at-top
  overrides = {k: ast.literal_eval(v) if v[:1] in '0123456789-([{' or v in ('True', 'False') else v
               for k, v in (kv.split('=', 1) for kv in args.set)}
  rows = []
  for size in args.sizes.split(','):
    for mesh in args.meshes.split(','):
      try:
        row = probe(size, mesh, overrides, args.per_device)
      except UserError as e:
        print(f'{size} {mesh}: {e}', flush=True)
        rows.append({'size': size, 'mesh': mesh, 'error': str(e)})
        continue
      rows.append(row)
      print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
  depth_rows = []
  for layers in [int(x) for x in args.depth.split(',') if x]:
    for scan in (False, True):
      row = probe('124m', 'fsdp', {**overrides, 'model.num_layers': layers, 'model.scan_layers': scan})
      depth_rows.append({k: row[k] for k in ('layers', 'scan_layers', 'compile_s', 'flops_ratio', 'peak_gb')})
      print(depth_rows[-1], flush=True)
  lines = ['| preset | mesh (data, fsdp, tensor) | state GB/device | peak GB/device | FLOPs/device over model '
           'FLOPs/8 | collectives GB/device/step (parameters GB) | compile s |', '|---|---|---|---|---|---|---|']
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r["size"]} | {r["mesh"]} | refused: {r["error"]} | | | | |')
      continue
    kinds = ', '.join(f'{k} {v["gb"]:.2f}' for k, v in sorted(r['collectives'].items()))
    lines.append(f'| {r["size"]} | {r["mesh"]} {r["mesh_shape"]} | {r["state_gb"]:.3f} | {r["peak_gb"]:.2f} | '
                 f'{r["flops_ratio"]:.3f} | {r["collective_gb"]:.2f} ({kinds}) ({r["param_gb"]:.3f}) | '
                 f'{r["compile_s"]:.0f} |')
  if depth_rows:
    lines += ['', '| layers (124m width, fsdp=8) | scanned | compile s |', '|---|---|---|']
    lines += [f'| {r["layers"]} | {r["scan_layers"]} | {r["compile_s"]:.1f} |' for r in depth_rows]
  write(args.out, {'rows': rows, 'depth': depth_rows}, '\n'.join(lines))


if __name__ == '__main__':
  sys.exit(main())
