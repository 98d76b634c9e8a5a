"""Eval metrics on hand-made predictions, and the masked eval step."""
import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from model_zoo.tasks.losses import classification_metrics


def test_hand_computed_confusion():
  # true: 0 0 0 1 1 2   predicted: 0 0 1 1 2 2
  confusion = np.array([[2, 1, 0],
                        [0, 1, 1],
                        [0, 0, 1]])
  m = classification_metrics(confusion)
  precision = [2 / 2, 1 / 2, 1 / 2]
  recall = [2 / 3, 1 / 2, 1 / 1]
  f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
  assert m['accuracy'] == pytest.approx(4 / 6)
  assert m['precision_macro'] == pytest.approx(np.mean(precision))
  assert m['recall_macro'] == pytest.approx(np.mean(recall))
  assert m['f1_macro'] == pytest.approx(np.mean(f1))


def test_never_predicted_and_absent_classes_as_scikit_learn_counts_them():
  # true 0 0 0 1 1, predicted all 0: class 1 never predicted (precision 0), class 2 appears nowhere (left out)
  confusion = np.array([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
  m = classification_metrics(confusion)
  assert (m['precision_macro'], m['recall_macro'], m['f1_macro']) == pytest.approx((0.3, 0.5, 0.375))
  p, r, f, _ = precision_recall_fscore_support([0, 0, 0, 1, 1], [0] * 5, average='macro', zero_division=0)
  assert (m['precision_macro'], m['recall_macro'], m['f1_macro']) == pytest.approx((p, r, f))


def test_agrees_with_scikit_learn_on_random_predictions():
  rng = np.random.default_rng(0)
  true, pred = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
  confusion = np.zeros((7, 7))
  np.add.at(confusion, (true, pred), 1)
  p, r, f, _ = precision_recall_fscore_support(true, pred, average='macro', zero_division=0)
  m = classification_metrics(confusion)
  assert (m['precision_macro'], m['recall_macro'], m['f1_macro']) == pytest.approx((p, r, f))
  assert m['accuracy'] == pytest.approx(np.mean(true == pred))
