"""Tasks: where a model meets its loss and its metrics."""
