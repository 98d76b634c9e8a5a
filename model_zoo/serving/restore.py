"""A trained work directory as a Servable: restored as eval.py restores it (a driver, like
model_zoo.evaluation.evaluate), each inference function jitted on its weights."""
import jax
import numpy as np

from model_zoo.evaluation import evaluate
from model_zoo.serving.servable import Function, Servable, flat_inputs
from model_zoo.tasks.base import Input


def from_workdir(config, workdir: str, name: str, step: int | None = None) -> Servable:
  """The model of a trained work directory, each function jitted on its restored weights."""
  _, exp, step, state, _ = evaluate._restore(config, workdir, step)  # pylint: disable=protected-access
  return servable_of(exp.task, exp.task.variables(state), name, step)


def servable_of(task, variables: dict, name: str, version: int) -> Servable:
  """`task.serving()`'s functions, each jitted on its weights from `variables`."""
  variables = jax.device_get(variables)
  functions = {}
  for fn_name, serving in task.serving().items():
    weights = jax.device_put(serving.weights_of(variables))
    jitted = jax.jit(serving.fn)
    donating = jax.jit(lambda w, donated, rest, fn=serving.fn: fn(w, {**donated, **rest}), donate_argnums=1)
    example = jax.tree.map(lambda i: np.zeros((1, *[1 if isinstance(d, str) else d for d in i.shape]), i.dtype),
                           serving.inputs, is_leaf=lambda x: isinstance(x, Input))
    outputs = jax.eval_shape(jitted, weights, example)
    functions[fn_name] = Function(fn_name, flat_inputs(serving.inputs), sorted(outputs),
                                  lambda inputs, jitted=jitted, weights=weights: jitted(weights, inputs),
                                  dict(serving.notes),
                                  lambda donated, rest, d=donating, weights=weights: d(weights, donated, rest))
  return Servable(name, version, functions, list(task.info.class_names), task.info.tokenizer)
