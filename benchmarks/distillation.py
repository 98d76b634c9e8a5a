"""Knowledge distillation of the default configs: a student trained on labels alone against the same student
distilled from a trained teacher, at the same number of steps, over 3 seeds (mean and spread).

  python benchmarks/distillation.py [--root=/tmp/model_zoo_distillation] [--runs=digits]

What train.py and eval.py do, in this process: each run trains in <root>/<run> (reused once it has an
eval.json) and is evaluated on the same eval split.
  digits  Hinton et al. (2015)'s MNIST experiment on `digits`: the CNN default as the teacher (seed 0), the MLP
          default as the student, alone and distilled (T = 20, alpha = 0.5, KL), seeds 0, 1, 2;
          the table says how much of the teacher-student gap distillation closes
Writes benchmarks/results/distillation.{json,md}. Not a test.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from model_zoo.evaluation import evaluate  # pylint: disable=wrong-import-position
from model_zoo.training import loop  # pylint: disable=wrong-import-position

SEEDS = (0, 1, 2)
DIGITS_KD = {'distill.temperature': 20.0, 'distill.alpha': 0.5, 'distill.distance': 'kl'}


def runs(group: str):
  """[(run name, config file, overrides, metric, teacher run or None)]"""
  if group == 'digits':
    return ([('digits_teacher', 'cnn.py', {}, 'accuracy', None)]
            + [(f'digits_student_s{s}', 'mlp.py', {'seed': s}, 'accuracy', None) for s in SEEDS]
            + [(f'digits_distilled_s{s}', 'mlp.py', {'seed': s, **DIGITS_KD}, 'accuracy', 'digits_teacher')
               for s in SEEDS])
  raise SystemExit(f'unknown run group {group!r}')


def config_of(file: str, overrides: dict, teacher: str | None, root: str):
  return common.load(file, {**overrides, **({'distill.teacher': os.path.join(root, teacher)} if teacher else {})})


def measure(name, file, overrides, metric, teacher, root) -> dict:
  config = config_of(file, overrides, teacher, root)
  workdir = os.path.join(root, name)
  seconds = None
  if not os.path.exists(os.path.join(workdir, 'eval.json')):
    start = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
  m = evaluate.evaluate(config, workdir)
  return {'config': file, 'overrides': overrides, 'teacher': teacher, 'metric': metric, 'value': m[metric],
          'teacher_agreement': m.get('teacher_agreement'), 'train_seconds': seconds}


def _stats(rows, names):
  values = [rows[n]['value'] for n in names if n in rows]
  return (float(np.mean(values)), float(np.std(values)), len(values)) if values else None


def table(rows: dict) -> str:
  lines = ['| experiment | metric | teacher | student alone (mean ± std) | distilled (mean ± std) | gap closed | '
           'distilled agreement with the teacher |', '|---|---|---|---|---|---|---|']
  if 'digits_teacher' in rows:
    t = rows['digits_teacher']['value']
    alone = _stats(rows, [f'digits_student_s{s}' for s in SEEDS])
    kd = _stats(rows, [f'digits_distilled_s{s}' for s in SEEDS])
    if alone and kd:
      agreement = np.mean([rows[f'digits_distilled_s{s}']['teacher_agreement'] for s in SEEDS
                           if f'digits_distilled_s{s}' in rows])
      lines.append(f'| digits: CNN teacher, MLP student, T=20 ({kd[2]} seeds) | test accuracy | {t:.4f} | '
                   f'{alone[0]:.4f} ± {alone[1]:.4f} | {kd[0]:.4f} ± {kd[1]:.4f} | '
                   f'{(kd[0] - alone[0]) / (t - alone[0]):.0%} | {agreement:.4f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='/tmp/model_zoo_distillation')
  parser.add_argument('--runs', default='digits')
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'distillation'))
  args = parser.parse_args()
  rows = {}
  if os.path.exists(args.output + '.json'):
    with open(args.output + '.json') as f:
      rows = json.load(f).get('rows', {})
  for group in args.runs.split(','):
    for name, *spec in runs(group):
      if name in rows:
        continue
      rows[name] = measure(name, *spec, args.root)
      common.write(args.output, rows, table(rows))


if __name__ == '__main__':
  main()
