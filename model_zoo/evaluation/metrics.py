"""Metrics computed on the host from summed statistics."""
import numpy as np


def classification_metrics(confusion) -> dict[str, float]:
  """Accuracy and macro precision/recall/F1 from a confusion matrix (rows: true, columns: predicted).

  A class that is never predicted has precision 0, one that never occurs has recall 0
  (scikit-learn's `zero_division=0`); macro averages run over all classes.
  """
  c = np.asarray(confusion, np.float64)
  tp = np.diag(c)
  predicted, actual = c.sum(0), c.sum(1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  return {'accuracy': float(tp.sum() / c.sum()), 'precision_macro': float(precision.mean()),
          'recall_macro': float(recall.mean()), 'f1_macro': float(f1.mean())}
