"""Knowledge distillation (model_zoo.compression.distill, SupervisedTask.loss_fn): the loss against a
float64 computation with its T^2, the teacher untouched and out of the student's checkpoint, exact
resume, teacher_agreement, and the mistakes."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import read_metrics, saved_state, tiny_config
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.tasks import losses
from model_zoo.training import loop


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize('temperature', [1.0, 2.0, 20.0])
def test_the_kl_distance_is_t_squared_kl_of_the_softened_distributions(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 3, (4, 6, 9)).astype(np.float32), rng.normal(0, 3, (4, 6, 9)).astype(np.float32)
  p_t, log_p_s = np.exp(_log_softmax(t / temperature)), _log_softmax(s / temperature)
  by_hand = temperature ** 2 * np.sum(p_t * (np.log(p_t) - log_p_s), -1)
  np.testing.assert_allclose(losses.distillation(jnp.asarray(s), jnp.asarray(t), temperature, 'kl'), by_hand,
                             rtol=2e-5, atol=1e-6)
  # its gradient: T (softmax(s/T) - softmax(t/T)), whose scale does not fall as 1/T^2 (Hinton et al., sec. 2)
  grad = jax.grad(lambda x: jnp.sum(losses.distillation(x, jnp.asarray(t), temperature, 'kl')))(jnp.asarray(s))
  np.testing.assert_allclose(grad, temperature * (np.exp(log_p_s) - p_t), rtol=1e-4, atol=1e-6)
  hard = -np.take_along_axis(_log_softmax(s), t.argmax(-1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.distillation(jnp.asarray(s), jnp.asarray(t), temperature, 'hard'), hard,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.distillation(jnp.asarray(s), jnp.asarray(t), temperature, 'mse'),
                             np.mean((s.astype(np.float64) - t) ** 2, -1), rtol=1e-5)


def _student(teacher_dir, **kw):
  return tiny_config('mlp', **{'model.hidden_sizes': (32,), 'num_train_steps': 16, 'checkpoint_every_steps': 4,
                               'eval_every_steps': 8, 'log_every_steps': 4, 'distill.teacher': teacher_dir,
                               'distill.temperature': 4.0, 'distill.alpha': 0.7, **kw})


@pytest.fixture(scope='module')
def teacher_and_student(tmp_path_factory):
  root = tmp_path_factory.mktemp('distill')
  teacher, student = str(root / 'teacher'), str(root / 'student')
  loop.train_and_evaluate(tiny_config('cnn', num_train_steps=40), teacher)
  files = {os.path.join(r, f): open(os.path.join(r, f), 'rb').read() for r, _, fs in os.walk(teacher) for f in fs}
  loop.train_and_evaluate(_student(teacher), student)
  return teacher, student, files


def test_the_teacher_is_untouched_and_not_in_the_students_checkpoint(teacher_and_student, tmp_path):
  teacher, student, files = teacher_and_student
  after = {os.path.join(r, f): open(os.path.join(r, f), 'rb').read() for r, _, fs in os.walk(teacher) for f in fs}
  assert after == files   # bit-identical: nothing of the teacher's work directory was written
  plain = str(tmp_path / 'plain')
  loop.train_and_evaluate(_student(''), plain)
  shapes = lambda w: jax.tree.map(np.shape, saved_state(w, 16))
  assert shapes(student) == shapes(plain)   # the same state as an undistilled student: no teacher inside
  metrics = read_metrics(student)
  assert all('distill_loss' in m and 'task_loss' in m for m in metrics if m['split'] == 'train')
  for m in metrics:   # the objective: alpha * distillation + (1 - alpha) * cross-entropy
    if m['split'] == 'train':
      assert m['loss'] == pytest.approx(0.7 * m['distill_loss'] + 0.3 * m['task_loss'], rel=1e-5)


def test_alpha_zero_is_the_undistilled_run_exactly(teacher_and_student, tmp_path):
  teacher, _, _ = teacher_and_student
  a, b = str(tmp_path / 'alpha0'), str(tmp_path / 'plain')
  loop.train_and_evaluate(_student(teacher, **{'distill.alpha': 0.0, 'num_train_steps': 8}), a)
  loop.train_and_evaluate(_student('', num_train_steps=8), b)
  jax.tree.map(np.testing.assert_array_equal, saved_state(a, 8)['params'], saved_state(b, 8)['params'])


def test_a_distilled_run_resumes_exactly(teacher_and_student, tmp_path):
  teacher, student, _ = teacher_and_student
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(student, workdir)
  for step in ('12', '16'):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', step))
  loop.train_and_evaluate(_student(teacher), workdir)
  assert read_metrics(workdir) == read_metrics(student)
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 16), saved_state(student, 16))


def test_eval_reports_the_agreement_with_the_teacher(teacher_and_student):
  teacher, student, _ = teacher_and_student
  student_metrics = evaluate.evaluate(_student(teacher), student)
  with open(os.path.join(student, 'eval.json')) as f:
    assert json.load(f)['teacher_agreement'] == student_metrics['teacher_agreement']
  # by hand: the two models' predictions on the eval split, from their own eval runs' confusion of labels
  from model_zoo.experiment import prepare  # pylint: disable=g-import-not-at-top
  preds = []
  for config, workdir in ((tiny_config('cnn', num_train_steps=40), teacher), (_student(''), student)):
    run = prepare(config, workdir, ['test'], staging=False)
    ckpt = run.experiment.checkpoints(workdir)
    state = ckpt.restore(ckpt.latest_step(), run.experiment.abstract_state)
    ckpt.close()
    data = run.data['test']
    images = np.stack([data[i]['image'] for i in range(len(data))]) if hasattr(data, '__getitem__') else None
    preds.append(np.asarray(run.experiment.task.predict(state, {'image': images})).argmax(-1))
  assert student_metrics['teacher_agreement'] == pytest.approx(np.mean(preds[0] == preds[1]))


@pytest.mark.parametrize('overrides, message', [
    ({'distill.teacher': '/nonexistent/teacher'}, 'is not a trained workdir'),
    ({'distill.alpha': 1.5}, r'alpha weighs the teacher against the labels, in \[0, 1\]'),
    ({'distill.temperature': 0.0}, 'temperature must be > 0'),
    ({'distill.distance': 'cosine'}, "unknown distillation distance 'cosine'"),
    ({'dataset.classes': '0,1,2'}, 'a teacher must have the student\'s classes'),
])
def test_distillation_mistakes_are_one_line_and_write_nothing(teacher_and_student, tmp_path, overrides, message):
  teacher, _, _ = teacher_and_student
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=message) as e:
    loop.train_and_evaluate(_student(teacher, **overrides), workdir)
  assert '\n' not in str(e.value) and not os.path.exists(workdir)
