"""model_zoo's GPT train step against a PyTorch GPT of the same model and shapes, on this machine's CPU.

  python benchmarks/gpt_vs_pytorch.py                 # both shapes, ~10 minutes on 2 cores
  python benchmarks/gpt_vs_pytorch.py --shapes=a --rounds=4

The peer (below) is a nanoGPT-style model written to be the same function as configs/gpt.py with
`model.positional=learned`, no dropout: pre-LN blocks (LayerNorm with bias, eps 1e-5), attention without biases,
tanh GELU MLP with biases, tied input/output embedding, mean cross-entropy; AdamW (b2 0.95, weight decay 0.1)
after clipping the global norm to 1. It runs eager and under torch.compile, with as many threads as cores, its
attention F.scaled_dot_product_attention(is_causal=True). model_zoo runs its real train step as training runs it
between two logs (the loss and gradient-norm metrics, the masked weight decay, the layer-decay and freezing hooks;
accuracy is taken on logged steps only) on rows of one document (no segment ids, as the peer), and on packed rows
for comparison.

To keep the machine's drift out of the ratios, the systems take turns: each round times `--steps` steps of each,
and the table gives every system's median step over all rounds (and its best). The float32 matmul peak
(n = 2048, JAX and PyTorch) is measured in the same run. Writes benchmarks/results/gpt_vs_pytorch.{json,md}.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import ROOT, load, write
from model_zoo.data.base import DataInfo
from model_zoo.data.tokenizers import ByteTokenizer
from model_zoo.experiment import build_experiment
from model_zoo.training import perf, sharding

# (layers, d_model, heads, d_ff, seq_len, batch, vocab)
SHAPES = {'a': (6, 256, 4, 1024, 128, 16, 512), 'small': (6, 512, 8, 2048, 256, 32, 4096)}


class Block(nn.Module):

  def __init__(self, d, heads, d_ff):
    super().__init__()
    self.heads = heads
    self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
    self.fc, self.fc_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
               for z in self.qkv(self.ln_1(x)).split(d, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate='tanh'))


class TorchGPT(nn.Module):

  def __init__(self, layers, d, heads, d_ff, seq_len, vocab):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
    self.blocks = nn.ModuleList([Block(d, heads, d_ff) for _ in range(layers)])
    self.ln_f = nn.LayerNorm(d)

  def forward(self, tokens, targets):
    x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.ln_f(x) @ self.wte.weight.T
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_step(shape, compiled: bool):
  layers, d, heads, d_ff, t, b, v = shape
  torch.manual_seed(0)
  model = TorchGPT(layers, d, heads, d_ff, t, v)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                          lr=3e-4, betas=(0.9, 0.95))
  forward = torch.compile(model) if compiled else model
  tokens, targets = torch.randint(3, v, (b, t)), torch.randint(3, v, (b, t))

  def step():
    loss = forward(tokens, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()
  return step


class _Vocab(ByteTokenizer):

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def jax_step(shape, packed: bool):
  layers, d, heads, d_ff, t, b, v = shape
  config = load('gpt.py:size=small', {
      'model.num_layers': layers, 'model.d_model': d, 'model.num_heads': heads, 'model.d_ff': d_ff,
      'model.max_len': t, 'model.positional': 'learned', 'model.dropout_rate': 0.0, 'model.dtype': 'float32',
      'dataset.seq_len': t, 'dataset.vocab_size': v, 'batch_size': b, 'mesh.data': 1, 'mesh.fsdp': 1,
      'mesh.tensor': 1})
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(3, v, (b, t), dtype=np.int32), 'targets': rng.integers(3, v, (b, t), dtype=np.int32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           'weights': np.ones((b, t), np.float32)}
  if packed:   # four documents a row
    batch['segment_ids'] = np.repeat(np.arange(1, 5, dtype=np.int32), t // 4)[None].repeat(b, 0)
    batch['positions'] = np.tile(np.arange(t // 4, dtype=np.int32), 4)[None].repeat(b, 0)
  example = {k: x[0] for k, x in batch.items()}
  example.setdefault('segment_ids', np.ones_like(example['inputs']))
  exp = build_experiment(config, DataInfo(example, tokenizer=_Vocab(v)))
  state = [exp.init_state()]
  train = exp.train_step()   # as training runs it (no accuracy: Task.logged_only)
  batch = sharding.to_global(batch, exp.mesh)

  def step():
    state[0], metrics = train(state[0], batch, np.int32(0), None)
    return float(metrics['loss'])
  step.hlo_text = lambda: train.lower(state[0], batch, np.int32(0), None).compile().as_text()   # profile_step.py
  return step


def torch_peak(n=2048, repeats=5) -> float:
  a = torch.randn(n, n)
  best = 0.0
  for _ in range(repeats + 1):
    start = time.perf_counter()
    a @ a
    best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--shapes', default='a,small')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='steps of each system in a round')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'))
  args = parser.parse_args()
  unknown = [name for name in args.shapes.split(',') if name not in SHAPES]
  if unknown or args.rounds < 1 or args.steps < 1:
    parser.error(f'--shapes takes names from {sorted(SHAPES)} (got {unknown})' if unknown
                 else '--rounds and --steps must be at least 1')
  torch.set_num_threads(os.cpu_count())
  peaks = {'jax': perf.measured_matmul_peak('float32', sizes=(2048,), repeats=5), 'torch': torch_peak()}
  rows = []
  for name in args.shapes.split(','):
    shape = SHAPES[name]
    systems = {'model_zoo': jax_step(shape, packed=False), 'model_zoo packed': jax_step(shape, packed=True),
               'pytorch eager': torch_step(shape, compiled=False), 'pytorch compile': torch_step(shape, compiled=True)}
    for step in systems.values():   # compile, warm up
      step(), step()
    times = {s: [] for s in systems}
    for _ in range(args.rounds):
      for s, step in systems.items():
        for _ in range(args.steps):
          start = time.perf_counter()
          step()
          times[s].append(time.perf_counter() - start)
    layers, d, heads, d_ff, t, b, v = shape
    tokens = b * t
    # 6 N + 6 L d T per token (causal attention), N the matmul parameters (the tied output projection included).
    flops = 6 * (layers * (4 * d * d + 2 * d * d_ff) + v * d) + 6 * layers * d * t
    best_torch = max(tokens / np.median(times[s]) for s in ('pytorch eager', 'pytorch compile'))
    for s, ts in times.items():
      rate = tokens / float(np.median(ts))
      rows.append({'shape': name, 'layers': layers, 'd_model': d, 'heads': heads, 'seq_len': t, 'batch': b,
                   'vocab': v, 'system': s, 'tokens_per_s': rate, 'best_tokens_per_s': tokens / float(np.min(ts)),
                   'share_of_matmul_peak': rate * flops / peaks['jax' if s.startswith('model_zoo') else 'torch'],
                   'vs_faster_pytorch': rate / best_torch, 'steps_timed': len(ts)})
      print(rows[-1], flush=True)
  header = ('| shape | system | tokens/s (median) | best | share of float32 matmul peak | vs the faster PyTorch |')
  lines = [f'float32 matmul peak (n = 2048): JAX {peaks["jax"] / 1e9:.0f} GFLOP/s, PyTorch {peaks["torch"] / 1e9:.0f} '
           f'GFLOP/s', '', header, '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["shape"]}: {r["layers"]} x d{r["d_model"]}, T {r["seq_len"]}, B {r["batch"]}, V {r["vocab"]} | '
                 f'{r["system"]} | {r["tokens_per_s"]:,.0f} | {r["best_tokens_per_s"]:,.0f} | '
                 f'{r["share_of_matmul_peak"]:.2f} | {r["vs_faster_pytorch"]:.2f}x |')
  os.makedirs(args.out, exist_ok=True)
  write(os.path.join(args.out, 'gpt_vs_pytorch'), {'matmul_peak_gflops': {k: v / 1e9 for k, v in peaks.items()},
                                                   'torch': torch.__version__, 'rows': rows}, '\n'.join(lines))


if __name__ == '__main__':
  main()
