"""Export to a TensorFlow SavedModel, what TF Serving runs: each inference function of the model (its task's
`serving()`) converted by `jax2tf.convert` (native serialization: the StableHLO program inside an
XlaCallModule op) with a symbolic batch, its weights as TF variables, one signature per function
(`serving_default` for the model's first), verified by loading it back with `tf.saved_model.load`.

  pip install -e '.[tf]'
  python eval.py --config=configs/cnn.py --workdir=runs/cnn --mode=export --format=savedmodel --output=DIR

DIR holds the SavedModel (saved_model.pb, variables/), and signature.json, reference_io.npz and config.json as
the StableHLO export writes them. Signature inputs and outputs are the function's, their names flattened with
'__' for '/' (a decoder's `cache__block_0__self_attention__cached_key`), as TF needs plain names.
"""
import re

import jax
import ml_collections
import numpy as np

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.tasks.base import Input
from model_zoo.transfer import stablehlo
from model_zoo.workdir import Workdir


def tensorflow():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'--format=savedmodel needs TensorFlow ({e}): pip install -e \'.[tf]\'') from e
  return tf, jax2tf


def tf_name(name: str) -> str:
  """A flat name as TF takes it: '/' as '__', other characters outside [A-Za-z0-9_] as '_' ('state/[0]')."""
  return re.sub(r'[^A-Za-z0-9_]', '_', name.replace('/', '__'))


def _signature(tf, converted, weights, specs):
  """The concrete tf.function of one signature: the weights captured, the inputs as `specs` give them."""
  @tf.function(input_signature=[specs], autograph=False)
  def serve(inputs):
    return converted(weights, inputs)
  return serve.get_concrete_function()


def export(config: ml_collections.ConfigDict, task, variables: dict, data, workdir: Workdir, outdir: str,
           step: int = 0) -> str:
  """Writes, verifies and keeps the SavedModel of `task.serving()` on `variables` in `outdir`."""
  from model_zoo.transfer.export import check_output  # pylint: disable=g-import-not-at-top
  tf, jax2tf = tensorflow()
  check_output(outdir)
  functions = task.serving()
  atol, rtol = stablehlo.tolerance(config)
  variables = jax.device_get(variables)
  with paths.staged_directory(outdir) as tmp:
    module, signatures, reference = tf.Module(), {}, {}
    signature = {'format': 'savedmodel', 'step': step, 'functions': {}, 'labels': list(task.info.class_names)}
    default = 'model' if 'model' in functions else next(iter(functions))
    for name, serving in functions.items():
      tree, restore = stablehlo._as_stored(config, serving.weights_of(variables))  # pylint: disable=protected-access
      names, leaves, treedef = stablehlo.flatten(tree)
      weights = [tf.Variable(x, trainable=False) for x in leaves]
      setattr(module, f'{name}_weights', weights)
      in_names, in_specs, in_tree = stablehlo.flatten(serving.inputs, is_leaf=lambda x: isinstance(x, Input))

      def fn_jax(weights, flat_inputs, fn=serving.fn, treedef=treedef, restore=restore, in_tree=in_tree,
                 in_names=in_names):
        inputs = jax.tree.unflatten(in_tree, [flat_inputs[tf_name(n)] for n in in_names])
        outputs = fn(restore(jax.tree.unflatten(treedef, weights)), inputs)
        out_names, out_leaves, _ = stablehlo.flatten(outputs, numpy=False)
        return {tf_name(n): x for n, x in zip(out_names, out_leaves)}

      shapes = {tf_name(n): '(' + ', '.join(['batch'] + [str(d) for d in i.shape]) + ')'
                for n, i in zip(in_names, in_specs)}
      converted = jax2tf.convert(fn_jax, polymorphic_shapes=[None, shapes],
                                 polymorphic_constraints=serving.constraints, with_gradient=False)
      specs = {tf_name(n): tf.TensorSpec([None] + [None if isinstance(d, str) else d for d in i.shape],
                                         tf.as_dtype(np.dtype(i.dtype)), name=tf_name(n))
               for n, i in zip(in_names, in_specs)}

      key = 'serving_default' if name == default else name
      signatures[key] = _signature(tf, converted, weights, specs)
      inputs = stablehlo.reference_inputs(serving, data, reference)
      reference[name] = (inputs, jax.device_get(jax.jit(serving.fn)(serving.weights_of(variables), inputs)))
      signature['functions'][name] = {'signature_name': key, 'inputs': list(specs),
                                      'tolerance': {'atol': atol, 'rtol': rtol}, **serving.notes}
    tf.saved_model.save(module, tmp, signatures=signatures)
    stablehlo.write_alongside(tmp, reference, signature, config, workdir)

    # Verification: TF loads the directory and runs each signature, as TF Serving would.
    loaded = tf.saved_model.load(tmp)
    for name, (inputs, want) in reference.items():
      key = signature['functions'][name]['signature_name']
      got = run(loaded, key, inputs)
      stablehlo.check_reproduces('SavedModel', name, want, {k: got[tf_name(k)] for k in stablehlo.flatten(want)[0]},
                                 atol, rtol)
  print(f'exported signatures {", ".join(signatures)} (verified with tf.saved_model.load on '
        f'{stablehlo.NUM_EXAMPLES} eval examples)', flush=True)
  return outdir


def run(loaded, key: str, inputs: dict) -> dict:
  """Signature `key` of a loaded SavedModel on `inputs` (nested as the function's): {flat name: numpy array}."""
  names, leaves, _ = stablehlo.flatten(inputs)
  out = loaded.signatures[key](**{tf_name(n): x for n, x in zip(names, leaves)})
  return {k: v.numpy() for k, v in out.items()}
