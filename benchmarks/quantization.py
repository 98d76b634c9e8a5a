"""Post-training quantization and QAT of the default configs: metric float vs quantized on the same eval
split, bytes of the weights as stored, and CPU inference time per batch.

  python benchmarks/quantization.py [--root=/tmp/model_zoo_quantization] [--rows=cnn,mlp,gpt,...]

Trains each default config in <root>/<name> (reused when it has a checkpoint), then runs what a user runs:
`eval.py` (float), `eval.py --quantize=SCHEME` for each scheme, and for `cnn_qat` a QAT fine-tune of the
float CNN (`--config.init_from=<root>/cnn --config.quantization.mode=qat`, 300 steps at lr 1e-4) and its PTQ.
Writes benchmarks/results/quantization.json and quantization.md. Not a test.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from model_zoo.compression import ptq  # pylint: disable=wrong-import-position
from model_zoo.data import pipeline  # pylint: disable=wrong-import-position
from model_zoo.evaluation import evaluate  # pylint: disable=wrong-import-position
from model_zoo.experiment import prepare  # pylint: disable=wrong-import-position
from model_zoo.compression import settings  # pylint: disable=wrong-import-position
from model_zoo.training import loop, sharding  # pylint: disable=wrong-import-position
from model_zoo.workdir import Workdir  # pylint: disable=wrong-import-position

SCHEMES = ('int8', 'int8_dynamic', 'int4', 'int4_gptq')
# name: (config file, overrides, the metric reported, the run it fine-tunes from)
ROWS = {
    'mlp': ('mlp.py', {}, 'accuracy', None),
    'cnn': ('cnn.py', {}, 'accuracy', None),
    'cnn_qat': ('cnn.py', {'quantization.mode': 'qat', 'num_train_steps': 300, 'optimizer.learning_rate': 1e-4,
                           'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                           'eval_every_steps': 300, 'checkpoint_every_steps': 300}, 'accuracy', 'cnn'),
    'gpt': ('gpt.py', {}, 'nats_per_byte', None),
    'transformer': ('transformer.py', {}, 'exact_match', None),
    'bert': ('bert_pretrain.py', {}, 'accuracy', None),
    'bert_finetune': ('bert_finetune.py', {}, 'accuracy', 'bert'),
}


def load_config(name: str, root: str):
  file, overrides, _, source = ROWS[name]
  return common.load(file, {**overrides, **({'init_from': os.path.join(root, source)} if source else {})})


def inference_seconds(config, workdir: str, scheme: str | None, repeats: int = 20) -> float:
  """Median seconds of one jitted eval step on one eval batch (after compilation)."""
  run = prepare(config, workdir, [config.dataset.eval_split], staging=False)
  ckpt = run.experiment.checkpoints(workdir)
  step = ckpt.latest_step()
  state = ckpt.restore(step, run.experiment.abstract_state)
  ckpt.close()
  exp = run.experiment
  if scheme:
    exp, state, _ = ptq.quantize(run, state, step, settings.with_scheme(run.config, scheme))
  batch = sharding.to_global(next(iter(pipeline.eval_batches(run.data[config.dataset.eval_split],
                                                             batch_size=config.batch_size, prefetch=0))), exp.mesh)
  step_fn = jax.jit(exp.task.eval_step)
  jax.block_until_ready(step_fn(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step_fn(state, batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(name: str, root: str) -> dict:
  config = load_config(name, root)
  workdir = os.path.join(root, name)
  metric = ROWS[name][2]
  if not Workdir(workdir).has_checkpoints():
    start = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    print(f'{name}: trained in {time.perf_counter() - start:.0f} s', flush=True)
  row = {'config': ROWS[name][0], 'overrides': ROWS[name][1], 'metric': metric,
         'float': evaluate.evaluate(config, workdir)[metric]}
  schemes = ('int8', 'int8_dynamic') if name == 'cnn_qat' else SCHEMES
  for scheme in schemes:
    try:
      m = evaluate.evaluate(config, workdir, quantize=scheme)
    except Exception as e:  # pylint: disable=broad-except
      row[scheme] = {'error': str(e)}
      continue
    row[scheme] = {metric: m[metric], 'weight_bytes': m['weight_bytes'], 'float_weight_bytes': m['float_weight_bytes']}
    with open(os.path.join(workdir, 'quantized', scheme, str(json.load(open(Workdir(workdir).eval))['step']),
                           'metadata', 'metadata')) as f:
      row[scheme]['quantized_layers'] = json.load(f)['quantized_layers']
  if name in ('cnn', 'gpt'):
    row['seconds_per_eval_batch'] = {'float': inference_seconds(config, workdir, None),
                                     'int8': inference_seconds(config, workdir, 'int8'),
                                     'batch_size': config.batch_size}
  return row


def table(results: dict) -> str:
  lines = ['| run | metric | float | int8 | int8 + int8 inputs | int4 | int4 GPTQ | bytes int8 / float: all weights '
           '(quantized layers) | bytes int4 / float: all (quantized layers) |', '|---|---|---|---|---|---|---|---|---|']
  for name, row in results.items():
    cells = []
    for s in SCHEMES:
      r = row.get(s)
      cells.append('' if r is None else r.get('error', f'{r.get(row["metric"], float("nan")):.4f}')[:40])
    def ratio(s):
      if s not in row or 'weight_bytes' not in row[s]:
        return ''
      r, layers = row[s], row[s]['quantized_layers']
      return (f'{r["weight_bytes"] / r["float_weight_bytes"]:.3f} '
              f'({layers["weight_bytes"] / layers["float_weight_bytes"]:.3f})')
    lines.append(f'| {name} | {row["metric"]} | {row["float"]:.4f} | ' + ' | '.join(cells)
                 + f' | {ratio("int8")} | {ratio("int4")} |')
  lines += ['', '| run | batch | float s/batch | int8 s/batch |', '|---|---|---|---|']
  for name, row in results.items():
    if 'seconds_per_eval_batch' in row:
      t = row['seconds_per_eval_batch']
      lines.append(f'| {name} | {t["batch_size"]} | {t["float"]:.4f} | {t["int8"]:.4f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='/tmp/model_zoo_quantization')
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'quantization'))
  args = parser.parse_args()
  results = {}
  if os.path.exists(args.output + '.json'):
    with open(args.output + '.json') as f:
      results = json.load(f).get('rows', {})
  for name in args.rows.split(','):
    results[name] = measure(name, args.root)
    common.write(args.output, results, table(results))


if __name__ == '__main__':
  main()
