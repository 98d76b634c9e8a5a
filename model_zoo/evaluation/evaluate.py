"""`eval.py`: restore a checkpoint, measure the eval split, write eval.json and plots.

The driver, not the task, reads data and other models: it loads the eval split and the splits the
task's `decode_metrics` asks for, and restores each of the task's scorers (training one first, and
saying so, when its work directory has no checkpoint).

With `quantize` (a scheme of model_zoo.compression.settings.SCHEMES), or a config whose
quantization.mode is 'ptq', every mode runs the quantized model (model_zoo.compression.ptq), and
--mode=eval writes eval-<SCHEME>.json (with the bytes of the weights as stored, and in float).
"""
import json
import os

import jax
from jax.experimental import multihost_utils

from model_zoo.compression import distill, pruning
from model_zoo.compression import settings as quantization_settings
from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.experiment import prepare
from model_zoo.paths import write_atomically
from model_zoo.tasks import registry as task_registry
from model_zoo.training import loop, sharding
from model_zoo.training.writer import read_metrics
from model_zoo.workdir import Workdir


FORMATS = ('safetensors', 'stablehlo', 'savedmodel', 'onnx')


def _quantized_config(config, quantize: str | None):
  """The config that quantizes the model (by `quantize`, else by config.quantization), or None."""
  if quantize:
    return quantization_settings.with_scheme(config, quantize)
  return config if config.quantization.mode == 'ptq' else None


def _restore(config, workdir, step, quantize: str | None = None):
  """-> (the checked run, the experiment of the model to use, its step, its state at that step, and
  for a quantized model {'weight_bytes', 'float_weight_bytes'})."""
  _quantized_config(config, quantize)   # a bad scheme is an error before anything is read
  run = prepare(config, workdir, [config.dataset.eval_split], staging=False)
  ckpt = run.experiment.checkpoints(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f'no checkpoint in {ckpt.directory}: train first with '
                      f'`python train.py --config=... --workdir={workdir}`')
    state = ckpt.restore(step, run.experiment.abstract_state)
  finally:
    ckpt.close()
  qconfig = _quantized_config(run.config, quantize)
  if qconfig is None:
    return run, run.experiment, step, state, {}
  from model_zoo.compression import ptq  # pylint: disable=g-import-not-at-top  (qwix, only when asked)
  exp, state, sizes = ptq.quantize(run, state, step, qconfig)
  return run, exp, step, state, sizes


def scorer(config, workdir: str, name: str):
  """predict(batch) of the model trained by `config` in `workdir`, trained there first if it has no checkpoint."""
  if not Workdir(workdir).has_checkpoints():
    print(f'training the evaluation {name} ({config.model.name}) in {workdir}', flush=True)
    loop.train_and_evaluate(config, workdir)
    evaluate(config, workdir)
  run, exp, _, state, _ = _restore(config, workdir, None)
  return jax.jit(lambda batch: exp.task.predict(state, batch))


def evaluate(config, workdir: str, step: int | None = None, quantize: str | None = None) -> dict[str, float]:
  run, exp, step, state, sizes = _restore(config, workdir, step, quantize)
  exp.teacher = distill.teacher(run)
  task = exp.task
  variant = quantization_settings.scheme(exp.config.quantization) if sizes else ''
  wd = Workdir(workdir, variant)
  metrics, stats = loop.make_eval_fn(exp)(state, run.data[run.config.dataset.eval_split])
  scorers = {name: scorer(cfg, path or wd.scorer(name), name) for name, (cfg, path) in task.scorers().items()}
  splits = task.decode_splits()
  decoded = task.decode_metrics(state, run.load(splits), wd, scorers, rows=sharding.BatchRows(exp.mesh))
  metrics.update(decoded)
  metrics.update(sizes)
  if pruning.enabled(run.config) and not sizes:   # the zeros of the pruned weights, overall and per layer
    metrics['sparsity'], metrics['sparsity_by_layer'] = pruning.measured_sparsity(
        task.variables(state)['params'], run.config.pruning.params)
  if jax.process_index() == 0:
    write_atomically(wd.eval, json.dumps({'step': step, **metrics}, indent=2).encode())
    if wd.metrics.exists() and not variant:
      plots.training_curves(read_metrics(wd.metrics)[0], wd.training_curves)
    task.eval_artifacts(stats, wd)
  shown = lambda ms: '  '.join(f'{k} {v:.4f}' for k, v in ms.items() if isinstance(v, float))
  line = (f'eval of step {step}{f" quantized as {variant}" if variant else ""} on {config.dataset.name}:'
          f'{config.dataset.eval_split}: ' + shown({k: v for k, v in metrics.items() if k not in decoded}))
  if decoded:   # the first decode split's metrics are unprefixed, the others' '<split>/<metric>'
    line += f'; {config.dataset.name}:{splits[0]}: ' if splits else '; '
    line += shown(decoded)
  print(line, flush=True)
  return metrics


def sample(config, workdir: str, prompts: list[str], *, step: int | None = None, seed: int = 0,
           max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
           num_samples: int = 1, quantize: str | None = None) -> list[str]:
  """Prints and returns `num_samples` continuations of each prompt."""
  if not hasattr(task_registry.TASKS.get(config.task), 'generate_text'):
    raise UserError(f'--mode=sample needs a language model; config.task is {config.task!r}')
  if max_new_tokens <= 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or num_samples < 1:
    raise UserError(f'--mode=sample needs --max_new_tokens > 0, --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1 '
                    f'and --num_samples >= 1; got {max_new_tokens}, {temperature}, {top_k}, {top_p}, {num_samples}')
  if not prompts:
    raise UserError('--mode=sample needs at least one --prompt ("" starts a new document)')
  run, exp, step, state, _ = _restore(config, workdir, step, quantize)
  vocab = exp.task.info.tokenizer.vocab_size
  if top_k > vocab:
    raise UserError(f'--top_k={top_k} is more than the {vocab} tokens of the vocabulary; use at most {vocab} '
                    f'(or 0 for all)')
  prompts = [p for p in prompts for _ in range(num_samples)]
  texts = exp.task.generate_text(state.params, prompts, jax.random.key(seed), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 rows=sharding.BatchRows(exp.mesh))
  if jax.process_index() == 0:
    for prompt, text in zip(prompts, texts):
      print(f'--- prompt: {prompt!r} (step {step})\n{prompt}{text}\n', flush=True)
  return texts


def translate(config, workdir: str, texts: list[str], *, step: int | None = None,
              quantize: str | None = None) -> list[str]:
  """Prints and returns translations of `texts` by the model in `workdir`."""
  if not hasattr(task_registry.TASKS.get(config.task), 'translate'):
    raise UserError(f'--mode=translate needs a translation model; config.task is {config.task!r}')
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if not texts or empty:
    raise UserError(f'--mode=translate needs a non-empty --input="..." (input {empty[0] + 1 if empty else 1} '
                    f'is empty)')
  _, exp, step, state, _ = _restore(config, workdir, step, quantize)
  outputs = exp.task.translate(state.params, texts, rows=sharding.BatchRows(exp.mesh))
  if jax.process_index() == 0:
    for source, output in zip(texts, outputs):
      print(f'{source}\t{output}', flush=True)
  return outputs


def interpret(config, workdir: str, method: str | None = None, texts: list[str] = (), *, step: int | None = None,
              quantize: str | None = None) -> dict:
  """Attributions, attention maps or latent views of the model in `workdir`, and their faithfulness:
  <workdir>/interpret.json and <workdir>/interpret/ (model_zoo.interpret.report)."""
  from model_zoo.interpret import report  # pylint: disable=g-import-not-at-top
  task_cls = task_registry.TASKS.get(config.task)
  if task_cls is not None:   # else prepare() names the known tasks
    report.check(config, task_cls, method)
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if empty:
    raise UserError(f'--input {empty[0] + 1} is empty; give a text, or no --input to use the eval split')
  if texts and not hasattr(task_cls, 'text_batch'):
    raise UserError(f'--input gives texts, but the {config.task} task does not read text; leave it out to use '
                    f'the eval split')
  run, exp, step, state, sizes = _restore(config, workdir, step, quantize)
  variant = quantization_settings.scheme(exp.config.quantization) if sizes else ''
  wd = Workdir(workdir, variant)
  figures = report.run(exp, state, run.data[run.config.dataset.eval_split], wd, method, list(texts),
                       step=step, sanity_check=not sizes)
  print(f'interpretation of step {step}{f" quantized as {variant}" if variant else ""} ({figures["method"]}) '
        f'in {wd.interpretations}: ' + '  '.join(f'{k} {v:.4f}' for k, v in figures.items() if isinstance(v, float)),
        flush=True)
  return figures


def export(config, workdir: str, output: str | None, *, step: int | None = None,
           quantize: str | None = None, format: str = 'safetensors') -> str:  # pylint: disable=redefined-builtin
  """Writes the model of `workdir` for inference to `output`: its weights (model_zoo.transfer.export) or its
  inference functions, as StableHLO (model_zoo.transfer.stablehlo), a SavedModel (.savedmodel) or ONNX (.onnx)."""
  from model_zoo.transfer import export as export_lib  # pylint: disable=g-import-not-at-top
  if format not in FORMATS:
    raise UserError(f'--format must be one of {", ".join(FORMATS)}, got {format!r}')
  output = output or str(Workdir(workdir).export)
  export_lib.check_output(output)
  if format == 'savedmodel':
    from model_zoo.transfer import savedmodel  # pylint: disable=g-import-not-at-top
    savedmodel.tensorflow()   # TensorFlow is there, before anything is restored
  if format == 'onnx':
    from model_zoo.transfer import onnx  # pylint: disable=g-import-not-at-top
    onnx.libraries()
  run, exp, step, state, _ = _restore(config, workdir, step, quantize)
  if format != 'safetensors':
    from model_zoo.transfer import onnx, savedmodel, stablehlo  # pylint: disable=g-import-not-at-top
    tool = {'stablehlo': stablehlo, 'savedmodel': savedmodel, 'onnx': onnx}[format]
    variables = export_lib.to_host(exp.task.variables(state))   # gathered by every process where they span hosts
    if jax.process_index() == 0:   # one process lowers, writes and verifies the programs
      tool.export(exp.config, exp.task, variables, run.data[run.config.dataset.eval_split], Workdir(workdir),
                  output, step=step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('model_zoo: export written')
  else:
    export_lib.export(exp.config, exp.task.variables(state)['params'], Workdir(workdir), output)
  print(f'exported step {step} of {workdir} to {output}', flush=True)
  return output
