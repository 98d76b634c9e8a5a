"""`eval.py`: restore a checkpoint, measure the eval split, write eval.json and plots.

The driver, not the task, reads data and other models: it loads the eval split and the splits the
task's `decode_metrics` asks for, and restores each of the task's scorers (training one first, and
saying so, when its work directory has no checkpoint).
"""
import json
import os

import jax

from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.experiment import prepare
from model_zoo.tasks import registry as task_registry
from model_zoo.training import loop
from model_zoo.training.writer import read_metrics
from model_zoo.workdir import Workdir


def _restore(config, workdir, step):
  """-> (the checked run, its step, its state at that step)."""
  run = prepare(config, workdir, [config.dataset.eval_split], staging=False)
  ckpt = run.experiment.checkpoints(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f'no checkpoint in {ckpt.directory}: train first with '
                      f'`python train.py --config=... --workdir={workdir}`')
    return run, step, ckpt.restore(step, run.experiment.abstract_state)
  finally:
    ckpt.close()


def scorer(config, workdir: str, name: str):
  """predict(batch) of the model trained by `config` in `workdir`, trained there first if it has no checkpoint."""
  if not Workdir(workdir).has_checkpoints():
    print(f'training the evaluation {name} ({config.model.name}) in {workdir}', flush=True)
    loop.train_and_evaluate(config, workdir)
    evaluate(config, workdir)
  run, _, state = _restore(config, workdir, None)
  return jax.jit(lambda batch: run.experiment.task.predict(state, batch))


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  run, step, state = _restore(config, workdir, step)
  task, wd = run.experiment.task, run.workdir
  metrics, stats = loop.make_eval_fn(run.experiment)(state, run.data[run.config.dataset.eval_split])
  scorers = {name: scorer(cfg, path or wd.scorer(name), name) for name, (cfg, path) in task.scorers().items()}
  metrics.update(task.decode_metrics(state, run.load(task.decode_splits()), wd, scorers))
  if jax.process_index() == 0:
    with open(wd.eval, 'w') as f:
      json.dump({'step': step, **metrics}, f, indent=2)
    if os.path.exists(wd.metrics):
      plots.training_curves(read_metrics(wd.metrics)[0], wd.training_curves)
    task.eval_artifacts(stats, wd)
  print(f'eval of step {step} on {config.dataset.name}:{config.dataset.eval_split}: '
        + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float)), flush=True)
  return metrics


def sample(config, workdir: str, prompts: list[str], *, step: int | None = None, seed: int = 0,
           max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
           num_samples: int = 1) -> list[str]:
  """Prints and returns `num_samples` continuations of each prompt."""
  if not hasattr(task_registry.TASKS.get(config.task), 'generate_text'):
    raise UserError(f'--mode=sample needs a language model; config.task is {config.task!r}')
  if max_new_tokens <= 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or num_samples < 1:
    raise UserError(f'--mode=sample needs --max_new_tokens > 0, --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1 '
                    f'and --num_samples >= 1; got {max_new_tokens}, {temperature}, {top_k}, {top_p}, {num_samples}')
  if not prompts:
    raise UserError('--mode=sample needs at least one --prompt ("" starts a new document)')
  run, step, state = _restore(config, workdir, step)
  vocab = run.experiment.task.info.tokenizer.vocab_size
  if top_k > vocab:
    raise UserError(f'--top_k={top_k} is more than the {vocab} tokens of the vocabulary; use at most {vocab} '
                    f'(or 0 for all)')
  prompts = [p for p in prompts for _ in range(num_samples)]
  texts = run.experiment.task.generate_text(state.params, prompts, jax.random.key(seed),
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p)
  for prompt, text in zip(prompts, texts):
    print(f'--- prompt: {prompt!r} (step {step})\n{prompt}{text}\n', flush=True)
  return texts


def translate(config, workdir: str, texts: list[str], *, step: int | None = None) -> list[str]:
  """Prints and returns translations of `texts` by the model in `workdir`."""
  if not hasattr(task_registry.TASKS.get(config.task), 'translate'):
    raise UserError(f'--mode=translate needs a translation model; config.task is {config.task!r}')
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if not texts or empty:
    raise UserError(f'--mode=translate needs a non-empty --input="..." (input {empty[0] + 1 if empty else 1} '
                    f'is empty)')
  run, step, state = _restore(config, workdir, step)
  outputs = run.experiment.task.translate(state.params, texts)
  for source, output in zip(texts, outputs):
    print(f'{source}\t{output}', flush=True)
  return outputs


def export(config, workdir: str, output: str | None, *, step: int | None = None) -> str:
  """Writes the model of `workdir` for inference (model_zoo.transfer.export) to `output`."""
  from model_zoo.transfer import export as export_lib  # pylint: disable=g-import-not-at-top
  output = output or Workdir(workdir).export
  run, step, state = _restore(config, workdir, step)
  export_lib.export(run.config, run.experiment.task.variables(state)['params'], Workdir(workdir), output)
  print(f'exported step {step} of {workdir} to {output}', flush=True)
  return output
