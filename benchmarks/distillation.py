"""Knowledge distillation of the default configs: a student trained on labels alone against the same student
distilled from a trained teacher, at the same number of steps, over 3 seeds (mean and spread).

  python benchmarks/distillation.py [--root=/tmp/model_zoo_distillation] [--runs=digits,gpt,bert]

What train.py and eval.py do, in this process: each run trains in <root>/<run> (reused once it has an
eval.json) and is evaluated on the same eval split.
  digits  Hinton et al. (2015)'s MNIST experiment on `digits`: the CNN default as the teacher (seed 0), the MLP
          default as the student, alone and distilled (T = 20, alpha = 0.5, KL), seeds 0, 1, 2;
          the table says how much of the teacher-student gap distillation closes
  gpt     the `small` GPT preset (6 x 512, at the student's 128 tokens, 300 steps) as the teacher, the `tiny`
          default as the student, 200 steps alone and distilled (T = 2, alpha = 0.5), nats/byte on pydoc
  bert    DistilBERT's recipe: the BERT pretraining default as the teacher; a 2-layer student from its first two
          blocks pretrained 400 masked-LM steps alone or distilled, then each fine-tuned on pydoc_topics by the
          fine-tuning default (the teacher too, for reference)
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
# The `small` GPT preset at the student's sequence length, trained briefly (this CPU: ~7 s a step) with the tiny
# default's dropout, which the offline corpus needs.
GPT_TEACHER = {'dataset.seq_len': 128, 'model.max_len': 128, 'model.dropout_rate': 0.3, 'num_train_steps': 300,
               'optimizer.learning_rate': 1.5e-3, 'optimizer.warmup_steps': 30, 'log_every_steps': 25,
               'eval_every_steps': 150, 'checkpoint_every_steps': 150}
GPT_STUDENT = {'num_train_steps': 200, 'eval_every_steps': 200, 'checkpoint_every_steps': 200}
# DistilBERT's recipe at the tiny size: a 2-layer student starts from the teacher's first two blocks (and its
# embeddings and MLM head) and pretrains on the masked-LM data, with or without the teacher; each is then fine-tuned
# on pydoc_topics by the fine-tuning default. '{root}' is the benchmark's root.
BERT_STUDENT = {'model.num_layers': 2, 'init_from': '{root}/bert_teacher', 'num_train_steps': 400,
                'optimizer.warmup_steps': 40, 'eval_every_steps': 400, 'checkpoint_every_steps': 400}


def runs(group: str):
  """[(run name, config file, overrides, metric, teacher run or None)]"""
  if group == 'digits':
    return ([('digits_teacher', 'cnn.py', {}, 'accuracy', None)]
            + [(f'digits_student_s{s}', 'mlp.py', {'seed': s}, 'accuracy', None) for s in SEEDS]
            + [(f'digits_distilled_s{s}', 'mlp.py', {'seed': s, **DIGITS_KD}, 'accuracy', 'digits_teacher')
               for s in SEEDS])
  if group == 'gpt':
    return ([('gpt_teacher', 'gpt.py:size=small', GPT_TEACHER, 'nats_per_byte', None)]
            + [(f'gpt_student_s{s}', 'gpt.py', {**GPT_STUDENT, 'seed': s}, 'nats_per_byte', None) for s in SEEDS]
            + [(f'gpt_distilled_s{s}', 'gpt.py', {**GPT_STUDENT, 'seed': s}, 'nats_per_byte', 'gpt_teacher')
               for s in SEEDS])
  if group == 'bert':
    pretrained = lambda arm, s: [
        (f'bert_{arm}_s{s}', 'bert_pretrain.py', {**BERT_STUDENT, 'seed': s}, 'accuracy',
         'bert_teacher' if arm == 'distilled' else None),
        (f'bert_{arm}_finetuned_s{s}', 'bert_finetune.py',
         {'model.num_layers': 2, 'init_from': f'{{root}}/bert_{arm}_s{s}', 'seed': s}, 'accuracy', None)]
    return ([('bert_teacher', 'bert_pretrain.py', {}, 'accuracy', None)]
            + [run for s in SEEDS for arm in ('student', 'distilled') for run in pretrained(arm, s)]
            + [('bert_teacher_finetuned', 'bert_finetune.py', {'init_from': '{root}/bert_teacher'}, 'accuracy', None)])
  raise SystemExit(f'unknown run group {group!r}')


def config_of(file: str, overrides: dict, teacher: str | None, root: str):
  overrides = {k: v.format(root=root) if isinstance(v, str) else v for k, v in overrides.items()}
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


# (label, metric shown, teacher row, student rows' prefix, distilled rows' prefix, rows holding the agreement)
EXPERIMENTS = (
    ('digits: CNN teacher, MLP student, T=20', 'test accuracy', 'digits_teacher', 'digits_student',
     'digits_distilled', 'digits_distilled'),
    ('pydoc: GPT `small` teacher, `tiny` student, 200 steps, T=2', 'nats/byte (lower is better)', 'gpt_teacher',
     'gpt_student', 'gpt_distilled', 'gpt_distilled'),
    ('pydoc_topics: BERT tiny teacher, 2-layer student (400 MLM steps, T=2), fine-tuned', 'test accuracy',
     'bert_teacher_finetuned', 'bert_student_finetuned', 'bert_distilled_finetuned', 'bert_distilled'),
)


def table(rows: dict) -> str:
  lines = ['| experiment | metric | teacher | student alone (mean ± std) | distilled (mean ± std) | gap closed | '
           'distilled agreement with the teacher |', '|---|---|---|---|---|---|---|']
  for label, metric, teacher, student, distilled, agreeing in EXPERIMENTS:
    alone = _stats(rows, [f'{student}_s{s}' for s in SEEDS])
    kd = _stats(rows, [f'{distilled}_s{s}' for s in SEEDS])
    if teacher not in rows or not alone or not kd:
      continue
    t = rows[teacher]['value']
    agreement = np.mean([rows[f'{agreeing}_s{s}']['teacher_agreement'] for s in SEEDS if f'{agreeing}_s{s}' in rows])
    lines.append(f'| {label} ({kd[2]} seeds) | {metric} | {t:.4f} | {alone[0]:.4f} ± {alone[1]:.4f} | '
                 f'{kd[0]:.4f} ± {kd[1]:.4f} | {(kd[0] - alone[0]) / (t - alone[0]):.0%} | {agreement:.4f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='/tmp/model_zoo_distillation')
  parser.add_argument('--runs', default='digits,gpt,bert')
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
  common.write(args.output, rows, table(rows))


if __name__ == '__main__':
  main()
