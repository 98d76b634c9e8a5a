"""Where the time of a GPT train step goes on the CPU: model_zoo's (jax.profiler) beside the PyTorch peer's
(torch.profiler, eager), at the shapes of gpt_vs_pytorch.py.

  python benchmarks/profile_step.py                  # shape a, ~1 minute
  python benchmarks/profile_step.py --shape=small

model_zoo: XLA's CPU runtime records each operation of the compiled step (a "thunk": a fused loop, a matmul
fusion handed to YNNPACK, ...), several at once on the thread pool. The matmuls are the `ynn_fusion`,
`xnn_fusion`, `onednn` and `dot` operations; the table gives the wall time they cover (their union, overlaps
counted once), the wall time only other operations cover, and the rest of the step (dispatch, waiting), and
the other operations by kind with their summed time (the step's time is measured unprofiled: the rest of the step
is what the operations' records do not cover, less the profiler's own cost). A plain `dot` (Eigen) is recorded as
its dispatch only: its work runs on the thread pool untraced and lands in the rest, with dispatch and waiting. PyTorch: eager, one operation after another on the main
thread, so self times add up to the step (its profiler's own cost makes them add up to more than the unprofiled
step: a negative rest); matmuls are aten::mm/addmm/bmm and the attention kernel. The matmul
GFLOP/s is the step's matmul FLOPs (6 N a token, N the matmul parameters, plus the causal attention's
6 L d T) over the matmul time.

A second table splits model_zoo's step by the part of the model each operation comes from (the compiled HLO's
op_name metadata: the attention kernel's products and its other operations, the q/k/v/out projections, the MLP,
the LayerNorms, the rest of the model (embedding, output layer, residual adds), and the loss, optimizer and
metrics), each the wall time its operations cover (parts may overlap, running at once), beside PyTorch's fused
attention kernel (forward and backward, its profiler's self time).
Writes benchmarks/results/profile_step_<shape>.{json,md}. Not a test.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
import torch

from common import ROOT, write
from gpt_vs_pytorch import SHAPES, jax_step, torch_step

MATMUL = re.compile(r'^(ynn_fusion|xnn_fusion|onednn|dot|custom-call)')
RUNTIME = re.compile(r'^(\$|np\.|Thunk|Slinky|PjRt|CommonPjRt|Pjit)')


def _union_us(intervals) -> float:
  total, end = 0.0, -float('inf')
  for start, stop in sorted(intervals):
    if start > end:
      total, end = total + stop - start, stop
    elif stop > end:
      total, end = total + stop - end, stop
  return total


def _median_step(step, steps: int) -> float:
  """Seconds a step, unprofiled (the median of `steps`)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _part(op_name: str) -> str:
  """The part of GPT's train step an operation of the compiled step comes from, by its op_name metadata."""
  if 'attention/' in op_name:
    if re.search(r'attention/(query|key|value|out)/', op_name):
      return 'attention projections'
    return 'attention kernel, products' if '->' in op_name else 'attention kernel, other operations'
  if '/mlp/' in op_name:
    return 'MLP (matmuls, GELU)'
  if 'norm/' in op_name:
    return 'LayerNorms'
  if 'GPT)' in op_name:
    return 'embedding, output layer, residual adds'
  return 'loss, optimizer, metrics'


def profile_jax(shape, steps: int) -> dict:
  step = jax_step(shape, packed=False)
  step(), step()
  wall = _median_step(step, steps)
  op_names = {}
  for line in step.hlo_text().split('\n'):
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"', line)
    if match:
      op_names[match.group(1)] = match.group(2)
  directory = tempfile.mkdtemp()
  with jax.profiler.trace(directory):
    for _ in range(steps):
      step()
  path = glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True)[0]
  ops = [e for e in json.load(gzip.open(path))['traceEvents'] if e.get('ph') == 'X' and not RUNTIME.match(e['name'])]
  matmul = [(e['ts'], e['ts'] + e['dur']) for e in ops if MATMUL.match(e['name'])]
  everything = [(e['ts'], e['ts'] + e['dur']) for e in ops]
  kinds, counts = collections.Counter(), collections.Counter()
  for e in ops:
    if not MATMUL.match(e['name']):
      kind = re.sub(r'[.\d]+$', '', e['name'])
      kinds[kind] += e['dur'] / steps / 1e3
      counts[kind] += 1 / steps
  matmul_ms = _union_us(matmul) / steps / 1e3
  parts = collections.defaultdict(list)
  for e in ops:
    if e['name'] in op_names:
      parts[_part(op_names[e['name']])].append((e['ts'], e['ts'] + e['dur']))
  return {'step_ms': wall * 1e3, 'matmul_ms': matmul_ms, 'other_ms': _union_us(everything) / steps / 1e3 - matmul_ms,
          'others': {k: {'ms': v, 'count': round(counts[k])} for k, v in kinds.most_common(8)},
          'parts_ms': {k: _union_us(v) / steps / 1e3 for k, v in sorted(parts.items())}}


def profile_torch(shape, steps: int) -> dict:
  step = torch_step(shape, compiled=False)
  step(), step()
  wall = _median_step(step, steps)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  own = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
  counts = {e.key: e.count / steps for e in prof.key_averages()}
  is_matmul = lambda k: k in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm') or 'scaled_dot_product' in k
  others = collections.Counter({k: v for k, v in own.items() if not is_matmul(k)})
  matmul_ms = sum(v for k, v in own.items() if is_matmul(k))
  return {'step_ms': wall * 1e3, 'matmul_ms': matmul_ms, 'other_ms': sum(others.values()),
          'others': {k: {'ms': v, 'count': round(counts[k])} for k, v in others.most_common(8)},
          'attention_kernel_ms': sum(v for k, v in own.items() if 'scaled_dot_product' in k)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shape', default='a', choices=sorted(SHAPES))
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'))
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  shape = SHAPES[args.shape]
  layers, d, _, d_ff, t, b, v = shape
  flops = b * t * (6 * (layers * (4 * d * d + 2 * d * d_ff) + v * d) + 6 * layers * d * t)
  rows = {'model_zoo': profile_jax(shape, args.steps), 'pytorch eager': profile_torch(shape, args.steps)}
  lines = [f'shape {args.shape}: {layers} x d{d}, T {t}, B {b}, V {v}; {flops / 1e9:.1f} GFLOP of matmuls a step', '',
           '| system | step ms | matmuls ms (GFLOP/s) | other operations ms | rest of the step ms | largest other '
           'operations (ms a step, count) |', '|---|---|---|---|---|---|']
  for name, r in rows.items():
    r['matmul_gflops'] = flops / (r['matmul_ms'] / 1e3) / 1e9
    top = ', '.join(f'{k} {o["ms"]:.1f} (x{o["count"]})' for k, o in list(r['others'].items())[:6])
    lines.append(f'| {name} | {r["step_ms"]:.0f} | {r["matmul_ms"]:.0f} ({r["matmul_gflops"]:.0f}) | '
                 f'{r["other_ms"]:.0f} | {r["step_ms"] - r["matmul_ms"] - r["other_ms"]:.0f} | {top} |')
  zoo, peer = rows['model_zoo'], rows['pytorch eager']
  lines += ['', f'model_zoo\'s step by part of the model (ms of wall time its operations cover; the step: '
            f'{zoo["step_ms"]:.0f} ms); PyTorch\'s fused attention kernel, forward and backward: '
            f'{peer["attention_kernel_ms"]:.0f} ms of its {peer["step_ms"]:.0f}', '',
            '| part | ms a step | share of the step |', '|---|---|---|']
  lines += [f'| {k} | {v:.0f} | {v / zoo["step_ms"]:.2f} |' for k, v in zoo['parts_ms'].items()]
  os.makedirs(args.out, exist_ok=True)
  write(os.path.join(args.out, f'profile_step_{args.shape}'), {'shape': shape, 'matmul_flops': flops, **rows},
        '\n'.join(lines))


if __name__ == '__main__':
  main()
