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
                             rtol=1e-4, atol=1e-6)   # float32: T^2 scales its rounding too
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
  # by hand: the two models' top-1 predictions on the eval split
  from model_zoo.data import pipeline  # pylint: disable=g-import-not-at-top
  from model_zoo.experiment import prepare  # pylint: disable=g-import-not-at-top
  models = []
  for config, workdir in ((tiny_config('cnn', num_train_steps=40), teacher), (_student(''), student)):
    run = prepare(config, workdir, ['test'], staging=False)
    ckpt = run.experiment.checkpoints(workdir)
    models.append((run.experiment.task, ckpt.restore(ckpt.latest_step(), run.experiment.abstract_state)))
    ckpt.close()
  agree = count = 0
  for batch in pipeline.eval_batches(run.data['test'], batch_size=32, prefetch=0):
    a, b = [np.asarray(task.predict(state, batch)).argmax(-1) for task, state in models]
    agree, count = agree + np.sum((a == b) * batch['mask']), count + np.sum(batch['mask'])
  assert student_metrics['teacher_agreement'] == pytest.approx(agree / count)


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



@pytest.mark.parametrize('name', ['gpt', 'bert', 'transformer', 'rnn_classifier'])
def test_each_kind_of_output_is_distilled_over_its_weighted_positions(name):
  """Token-level KD for a language model, the masked positions of BERT, the decoder's outputs in
  translation, a text classifier: distill_loss is the weighted mean of the per-position distance over
  `output_weights` (0 on padding), the teacher (another size of the same family) in evaluation mode."""
  from helpers import family_config, family_data  # pylint: disable=g-import-not-at-top
  from model_zoo.data import pipeline  # pylint: disable=g-import-not-at-top
  from model_zoo.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  from model_zoo.tasks.base import Teacher  # pylint: disable=g-import-not-at-top
  from model_zoo.training import sharding  # pylint: disable=g-import-not-at-top
  no_dropout = {'model.dropout_rate': 0.0}
  config = family_config(name, **no_dropout, **{'distill.temperature': 3.0})
  data = family_data(config)
  student = build_experiment(config, data.info)
  wider = {'gpt': {'model.d_model': 64}, 'bert': {'model.d_model': 64}, 'transformer': {'model.d_model': 64},
           'rnn_classifier': {'model.hidden_size': 48}}[name]
  teacher_exp = build_experiment(family_config(name, **no_dropout, **wider), data.info)
  teacher = Teacher(teacher_exp.task, teacher_exp.task.variables(teacher_exp.init_state()))
  state = student.init_state()
  batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=config.batch_size, seed=0, prefetch=0)),
                             student.mesh)
  task = student.task

  def probe(state, batch, teacher):
    _, (metrics, _) = task.loss_fn(state.params, state.model_state, batch, jax.random.key(0), teacher)
    w = task.output_weights(batch)
    agreement = task.teacher_agreement(state, {**batch, 'mask': jnp.ones(w.shape[0])}, teacher)
    return metrics['distill_loss'], task.predict(state, batch), teacher.outputs(batch), w, agreement
  distill_loss, s, t, w, agreement = jax.device_get(jax.jit(probe)(state, batch, teacher))
  s, t, w = (np.asarray(x, np.float64) for x in (s, t, w))
  assert s.shape == t.shape and w.shape == s.shape[:-1] and 0 < w.sum() <= w.size
  p_t = np.exp(_log_softmax(t / 3.0))
  per_position = 9.0 * np.sum(p_t * (np.log(p_t) - _log_softmax(s / 3.0)), -1)
  assert float(distill_loss) == pytest.approx((per_position * w).sum() / w.sum(), rel=1e-4)
  assert float(agreement['teacher_count']) == pytest.approx(w.sum())
  assert float(agreement['teacher_agree']) == pytest.approx(((s.argmax(-1) == t.argmax(-1)) * w).sum())


def test_a_teacher_with_other_tokens_or_another_task_is_refused(teacher_and_student, tmp_path):
  from helpers import family_config  # pylint: disable=g-import-not-at-top
  from model_zoo.compression import distill  # pylint: disable=g-import-not-at-top
  from model_zoo.workdir import Workdir  # pylint: disable=g-import-not-at-top
  gpt = family_config('gpt')
  other = family_config('gpt', **{'dataset.tokenizer': 'sentencepiece', 'dataset.vocab_size': 384})
  a, b = Workdir(str(tmp_path / 'a')), Workdir(str(tmp_path / 'b'))
  with pytest.raises(UserError, match='has a vocabulary of 384 .sentencepiece., the student 259 .bytes.'):
    distill._check_outputs(other, gpt, a, b, a.path)  # pylint: disable=protected-access
  for w, content in ((a, b'one'), (b, b'two')):
    os.makedirs(w.path)
    with open(w.tokenizer, 'wb') as f:
      f.write(content)
  with pytest.raises(UserError, match='is not the tokenizer of the teacher'):
    distill._check_outputs(other, other, a, b, a.path)  # pylint: disable=protected-access
  teacher, _, _ = teacher_and_student
  with pytest.raises(UserError, match='trained for the classification task, the student is for language_modeling'):
    loop.train_and_evaluate(family_config('gpt', **{'distill.teacher': teacher}), str(tmp_path / 'lm'))
  assert not os.path.exists(tmp_path / 'lm')
  with pytest.raises(UserError, match='the autoencoder task has no class or token outputs'):
    loop.train_and_evaluate(family_config('autoencoder', **{'distill.teacher': teacher}), str(tmp_path / 'ae'))
  assert not os.path.exists(tmp_path / 'ae')
