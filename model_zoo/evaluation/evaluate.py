"""`eval.py`: restore a checkpoint, measure the eval split, write eval.json and plots."""
import json
import os

import jax

from model_zoo import config as config_lib
from model_zoo.data import sources
from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.training import loop


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  config_lib.validate(config)
  data = sources.load(config.dataset, config.dataset.eval_split, workdir)
  exp = loop.build_experiment(config, data)
  ckpt = exp.checkpoints(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f'no checkpoint in {ckpt.directory}: train first with '
                      f'`python train.py --config=... --workdir={workdir}`')
    state = ckpt.restore(step, exp.abstract_state)
  finally:
    ckpt.close()
  metrics, stats = loop.make_eval_fn(exp)(state, data)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump({'step': step, **metrics}, f, indent=2)
    history = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(history):
      with open(history) as f:
        plots.training_curves([json.loads(line) for line in f if line.strip()],
                              os.path.join(workdir, 'training_curves.png'))
    exp.task.eval_artifacts(stats, workdir)
  print(f'eval of step {step} on {config.dataset.name}:{config.dataset.eval_split}: '
        + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()), flush=True)
  return metrics
