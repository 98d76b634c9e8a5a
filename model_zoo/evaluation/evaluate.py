"""`eval.py`: restore a checkpoint, measure the eval split, write eval.json and plots."""
import json
import os

import jax

from model_zoo import config as config_lib
from model_zoo import tasks
from model_zoo.data import sources
from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.training import loop
from model_zoo.transfer import finetune


def _restore(config, workdir, step):
  config = finetune.resolve(config)
  config_lib.validate(config)
  data = sources.load(config.dataset, config.dataset.eval_split, workdir)
  exp = loop.build_experiment(config, data)
  ckpt = exp.checkpoints(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f'no checkpoint in {ckpt.directory}: train first with '
                      f'`python train.py --config=... --workdir={workdir}`')
    return data, exp, step, ckpt.restore(step, exp.abstract_state)
  finally:
    ckpt.close()


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  data, exp, step, state = _restore(config, workdir, step)
  metrics, stats = loop.make_eval_fn(exp)(state, data)
  metrics.update(exp.task.decode_metrics(state, workdir))
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
        + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float)), flush=True)
  return metrics


def sample(config, workdir: str, prompts: list[str], *, step: int | None = None, seed: int = 0,
           max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
           num_samples: int = 1) -> list[str]:
  """Prints and returns `num_samples` continuations of each prompt."""
  if not hasattr(tasks.TASKS.get(config.task), 'generate_text'):
    raise UserError(f'--mode=sample needs a language model; config.task is {config.task!r}')
  if max_new_tokens <= 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UserError('need max_new_tokens > 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1')
  _, exp, step, state = _restore(config, workdir, step)
  prompts = [p for p in prompts for _ in range(num_samples)]
  texts = exp.task.generate_text(state.params, prompts, jax.random.key(seed), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
  for prompt, text in zip(prompts, texts):
    print(f'--- prompt: {prompt!r} (step {step})\n{prompt}{text}\n', flush=True)
  return texts


def translate(config, workdir: str, texts: list[str], *, step: int | None = None) -> list[str]:
  """Prints and returns translations of `texts` by the model in `workdir`."""
  if not hasattr(tasks.TASKS.get(config.task), 'translate'):
    raise UserError(f'--mode=translate needs a translation model; config.task is {config.task!r}')
  _, exp, step, state = _restore(config, workdir, step)
  outputs = exp.task.translate(state.params, texts)
  for source, output in zip(texts, outputs):
    print(f'{source}\t{output}', flush=True)
  return outputs


def export(config, workdir: str, output: str | None, *, step: int | None = None) -> str:
  """Writes the model of `workdir` for inference (model_zoo.transfer.export) to `output`."""
  from model_zoo.transfer import export as export_lib  # pylint: disable=g-import-not-at-top
  output = output or os.path.join(workdir, 'export')
  _, exp, step, state = _restore(config, workdir, step)
  export_lib.export(exp.config, state.params, workdir, output)
  print(f'exported step {step} of {workdir} to {output}', flush=True)
  return output
