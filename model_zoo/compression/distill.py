"""Knowledge distillation: the teacher a student learns from (Hinton et al., 2015).

  python train.py --config=configs/gpt.py:size=small --workdir=runs/gpt_small           # the teacher
  python train.py --config=configs/gpt.py --workdir=runs/gpt_distilled --config.distill.teacher=runs/gpt_small

`config.distill.teacher` is a trained work directory: its config.json builds the teacher (any family, for
the same task), its latest checkpoint fills it. The student's outputs must mean what the teacher's do:
the same data set and classes, or the same tokenizer and vocabulary (a fresh student takes the teacher's
tokenizer, as fine-tuning takes its source's). As in big_vision's distillation trainer, the teacher runs
in evaluation mode on exactly the student's (augmented) batch, under stop_gradient, and is passed to each
step as an argument: never in the student's train state, optimizer or checkpoint. The loss is
model_zoo.tasks.base.SupervisedTask.loss_fn's; eval.json gains `teacher_agreement`.
"""

import jax
from flax import traverse_util

from model_zoo import config as config_lib
from model_zoo.errors import UserError
from model_zoo.experiment import Run, build_experiment
from model_zoo.models.protocol import path_names
from model_zoo.tasks.base import SupervisedTask, Teacher
from model_zoo.transfer import finetune
from model_zoo.workdir import Workdir


def teacher(run: Run) -> Teacher | None:
  """The teacher of `run` (config.distill.teacher), checked against the student and restored; None without one."""
  config = run.config
  path = config.distill.teacher
  if not path:
    return None
  task = run.experiment.task
  if type(task).output_weights is SupervisedTask.output_weights:
    raise UserError(f'config.distill.teacher: the {config.task} task has no class or token outputs to distill; '
                    f'distillation works for classification, language modelling, masked LM and translation')
  source = Workdir(path)
  if not source.has_checkpoints() or not source.config.exists():
    raise UserError(f'config.distill.teacher={path!r} is not a trained workdir (no checkpoint or config.json): '
                    f'train the teacher first, `python train.py --config=... --workdir={path}`')
  tconfig = config_lib.from_json(source.config)
  if tconfig.task != config.task:
    raise UserError(f'the teacher in {path} was trained for the {tconfig.task} task, the student is for '
                    f'{config.task}: a teacher must have the same outputs as its student')
  _check_outputs(tconfig, config, source, run.workdir, path)
  texp = build_experiment(tconfig, task.info, run.experiment.mesh)
  # Only the model's variables, each read straight into its sharding (never the optimizer state).
  wanted = {path_names(k): v for k, v in
            traverse_util.flatten_dict(texp.task.variables(texp.abstract_state)).items()}
  source = finetune.CheckpointVariables(path)
  saved = source.shapes()
  unfit = [k for k, v in wanted.items() if saved.get(k) != tuple(v.shape)]
  if unfit:
    raise UserError(f'the checkpoint of the teacher in {path} (step {source.step}) does not fit the model its '
                    f'config.json builds: {"/".join(unfit[0])} is {saved.get(unfit[0], "absent")} there, '
                    f'{tuple(wanted[unfit[0]].shape)} in the model; retrain the teacher or fix its config.json')
  variables = traverse_util.unflatten_dict(source.read(wanted))
  if jax.process_index() == 0:
    print(f'distilling from {tconfig.model.name} in {path} (step {source.step})', flush=True)
  return Teacher(texp.task, variables)


def _check_outputs(tconfig, config, source: Workdir, workdir: Workdir, path: str):
  """The same classes, or the same tokenizer and vocabulary, as one line each otherwise."""
  t, s = tconfig.dataset, config.dataset
  if 'vocab_size' in s or 'vocab_size' in t:
    if t.get('vocab_size') != s.get('vocab_size') or t.get('tokenizer') != s.get('tokenizer'):
      raise UserError(f'the teacher in {path} has a vocabulary of {t.get("vocab_size")} ({t.get("tokenizer")}), '
                      f'the student {s.get("vocab_size")} ({s.get("tokenizer")}): set config.dataset.vocab_size and '
                      f'tokenizer to the teacher\'s')
    if source.tokenizer_differs(workdir):
      raise UserError(f'{workdir.tokenizer} is not the tokenizer of the teacher in {path}: the two models\' '
                      f'tokens differ; use a new --workdir (it takes the teacher\'s tokenizer)')
  if 'classification' in config.task and (t.name, t.get('classes', '')) != (s.name, s.get('classes', '')):
    raise UserError(f'the teacher in {path} classifies {t.name} (classes {t.get("classes") or "all"}), the student '
                    f'{s.name} (classes {s.get("classes") or "all"}): a teacher must have the student\'s classes')
