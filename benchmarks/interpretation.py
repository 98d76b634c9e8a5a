"""Faithfulness of the attributions (eval.py --mode=interpret) on the digits CNN and the BERT topic classifier.

  python benchmarks/interpretation.py [--root=/tmp/model_zoo_interpret] [--runs=cnn,bert,vit]

What train.py and eval.py do, in this process: each default config trains in <root>/<run> (reused once it has a
checkpoint), then `eval.py --mode=interpret` runs on it at the default config.interpret (all of the eval split
up to 512 examples, integrated gradients at 128 midpoints, SmoothGrad of 32 samples at 15% noise, occlusion
windows of 2, deletion at 33 fractions, baselines a black image and <mask> tokens):
  cnn   configs/cnn.py on digits (1500 steps); the test split's 355 images
  bert  configs/bert_pretrain.py (masked LM on pydoc), then configs/bert_finetune.py from it (8 labelled
        passages a topic); the pydoc_topics test split's 199 passages
  vit   configs/vit.py (the tiny default on digits, 3000 steps); the test split's 355 images
Writes benchmarks/results/interpretation.{json,md}; the rows of runs not asked for this time are kept from the
last results. Not a test.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from model_zoo.evaluation import evaluate  # pylint: disable=wrong-import-position
from model_zoo.interpret import attributions  # pylint: disable=wrong-import-position
from model_zoo.training import loop  # pylint: disable=wrong-import-position
from model_zoo.workdir import Workdir  # pylint: disable=wrong-import-position


def trained(file: str, workdir: str, **overrides):
  config = common.load(file, overrides)
  if not Workdir(workdir).has_checkpoints():
    loop.train_and_evaluate(config, workdir)
  return config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--root', default='/tmp/model_zoo_interpret')
  parser.add_argument('--runs', default='cnn,bert,vit')
  args = parser.parse_args()
  output = os.path.join(ROOT, 'benchmarks', 'results', 'interpretation')
  rows = {}
  if os.path.exists(output + '.json'):
    with open(output + '.json') as f:
      rows = json.load(f)['rows']
  for run in args.runs.split(','):
    start = time.time()
    if run == 'cnn':
      config = trained('cnn.py', os.path.join(args.root, 'cnn'))
      figures = evaluate.interpret(config, os.path.join(args.root, 'cnn'))
    elif run == 'vit':
      config = trained('vit.py', os.path.join(args.root, 'vit'))
      figures = evaluate.interpret(config, os.path.join(args.root, 'vit'))
    elif run == 'bert':
      trained('bert_pretrain.py', os.path.join(args.root, 'bert'))
      config = trained('bert_finetune.py', os.path.join(args.root, 'cls'), init_from=os.path.join(args.root, 'bert'))
      figures = evaluate.interpret(config, os.path.join(args.root, 'cls'))
    else:
      raise SystemExit(f'unknown run {run!r}: cnn, bert, vit')
    rows[run] = {**figures, 'seconds': round(time.time() - start, 1)}

  names = list(attributions.METHODS)
  lines = ['| model (eval split, examples) | accuracy | ' + ' | '.join(f'deletion AUC {m}' for m in names)
           + ' | random | IG / random | IG completeness error, mean (max) | rank corr. with random weights |',
           '|' + '---|' * (len(names) + 6)]
  for run, r in rows.items():
    lines.append(f'| {run} ({r["num_examples"]}) | {r["accuracy"]:.4f} | '
                 + ' | '.join(f'{r[f"deletion_auc/{m}"]:.4f}' for m in names)
                 + f' | {r["deletion_auc/random"]:.4f} | '
                 f'{r["deletion_auc/integrated_gradients"] / r["deletion_auc/random"]:.2f} | '
                 f'{r["ig_completeness_error"]:.4%} ({r["ig_completeness_error_max"]:.4%}) | '
                 f'{r["randomized_weights_rank_correlation"]:.3f} |')
  texts = [(run, r) for run, r in rows.items() if any(k.startswith('masked_top') for k in r)]
  if texts:
    k = 5
    lines += ['', f'| model | accuracy | ' + ' | '.join(f'top-{k} of {m} masked' for m in names)
              + f' | {k} random masked |', '|' + '---|' * (len(names) + 3)]
    for run, r in texts:
      lines.append(f'| {run} | {r["accuracy"]:.4f} | '
                   + ' | '.join(f'{r[f"masked_top{k}_accuracy/{m}"]:.4f}' for m in names)
                   + f' | {r[f"masked_random{k}_accuracy"]:.4f} |')
  common.write(output, rows, '\n'.join(lines))


if __name__ == '__main__':
  main()
