"""Metrics computed on the host from summed statistics."""
import numpy as np


def classification_metrics(confusion) -> dict[str, float]:
  """Accuracy and macro precision/recall/F1 from a confusion matrix (rows: true, columns: predicted).

  As scikit-learn's `precision_recall_fscore_support(average='macro', zero_division=0)`: the
  average runs over the classes that occur in the labels or the predictions; a class that is
  never predicted has precision 0, one that never occurs has recall 0.
  """
  c = np.asarray(confusion, np.float64)
  tp = np.diag(c)
  predicted, actual = c.sum(0), c.sum(1)
  present = (predicted + actual) > 0
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)[present]
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)[present]
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
  return {'accuracy': float(tp.sum() / max(c.sum(), 1)), 'precision_macro': float(precision.mean()),
          'recall_macro': float(recall.mean()), 'f1_macro': float(f1.mean())}
