"""Export to ONNX, for ONNX Runtime and the runtimes that read ONNX: each inference function of the model (its
task's `serving()`) converted by jax2onnx from its jaxpr, the weights inside the file as initializers, the
batch (and a prompt's or source's length) a symbolic dimension, verified with onnxruntime before it is kept.

  pip install -e '.[onnx]' && pip install --no-deps jax2onnx==0.17.1
  python eval.py --config=configs/cnn.py --workdir=runs/cnn --mode=export --format=onnx --output=DIR

jax2onnx is installed without its dependencies because it pins an orbax-checkpoint older than model_zoo's; it
never imports orbax, and the `onnx` extra declares what it does import (onnx, onnx-ir, onnxruntime, and the
equinox and dm-pix its plugin registry loads).

DIR holds `<function>.onnx` for each function (`model.onnx`, or `encode`/`decode`, `generate`, and
`prefill`/`decode_step` for the decoders, each with its own copy of the weights; a weight file over 1 MB spills
into `<function>.onnx.data` beside it), and signature.json, reference_io.npz and config.json as the StableHLO
export writes them. Input names are the flat names of signature.json ('cache/block_0/attention/cached_key');
an output with an input's name (decode_step's cache and positions) is called 'next/<name>', as ONNX names
must be unique in a graph.
"""
import logging
import os

import jax
import ml_collections
import numpy as np

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.tasks.base import Input
from model_zoo.transfer import stablehlo
from model_zoo.workdir import Workdir

JAX2ONNX = '0.17.1'
OPSET = 21
INSTALL = f"pip install -e '.[onnx]' && pip install --no-deps jax2onnx=={JAX2ONNX}"


def libraries():
  """(jax2onnx, onnxruntime), or one line on how to install them."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'--format=onnx needs jax2onnx and onnxruntime ({e}): {INSTALL}') from e
  return jax2onnx, onnxruntime


def output_name(name: str, inputs) -> str:
  return f'next/{name}' if name in inputs else name


def export(config: ml_collections.ConfigDict, task, variables: dict, data, workdir: Workdir, outdir: str,
           step: int = 0) -> str:
  """Writes, verifies and keeps the ONNX export of `task.serving()` on `variables` in `outdir`."""
  from model_zoo.transfer.export import check_output  # pylint: disable=g-import-not-at-top
  jax2onnx, _ = libraries()
  check_output(outdir)
  functions = task.serving()
  atol, rtol = stablehlo.tolerance(config)
  variables = jax.device_get(variables)
  quiet = [logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [q.level for q in quiet]
  with paths.staged_directory(outdir) as tmp:
    signature = {'format': 'onnx', 'step': step, 'opset': OPSET, 'functions': {},
                 'preprocessing': stablehlo._preprocessing(config, task.info),  # pylint: disable=protected-access
                 'labels': list(task.info.class_names)}
    reference = {}
    for name, serving in functions.items():
      tree, restore = stablehlo._as_stored(config, serving.weights_of(variables))  # pylint: disable=protected-access
      in_names, in_specs, in_tree = stablehlo.flatten(serving.inputs, is_leaf=lambda x: isinstance(x, Input))
      inputs = stablehlo.reference_inputs(serving, data, reference)
      outputs = jax.device_get(jax.jit(serving.fn)(serving.weights_of(variables), inputs))
      reference[name] = (inputs, outputs)
      out_names = [output_name(n, in_names) for n in stablehlo.flatten(outputs)[0]]

      # The weights closed over become the graph's initializers, as stored (a quantized model's int8, or int4 two
      # to a byte, with their scales, dequantized inside the graph).
      def flat_fn(*flat, fn=serving.fn, tree=tree, restore=restore, in_tree=in_tree):
        outputs = fn(restore(tree), jax.tree.unflatten(in_tree, list(flat)))
        return tuple(stablehlo.flatten(outputs, numpy=False)[1])

      dims = stablehlo._symbolic(serving)  # pylint: disable=protected-access
      specs = [jax.ShapeDtypeStruct((dims['batch'], *(dims[d] if isinstance(d, str) else d for d in i.shape)),
                                    i.dtype) for i in in_specs]
      file = f'{name}.onnx'
      try:
        convert = flat_fn
        if config.quantization.mode == 'ptq':
          # From the jaxpr, so that jax2onnx sees JAX primitives, not the flax modules it lowers by its own rules
          # (which take no qwix kernel). Its primitive rules are less complete: a 4-D max pool, for one, becomes
          # a MaxPool onnxruntime does not run, and the export is refused.
          closed = jax.make_jaxpr(flat_fn)(*specs)
          convert = lambda *flat, closed=closed: tuple(jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *flat))
        for q in quiet:
          q.setLevel(logging.ERROR)
        with jax.numpy_rank_promotion('allow'):   # jax2onnx's own lowerings rely on it
          jax2onnx.to_onnx(convert, specs, model_name=name, opset=OPSET, return_mode='file',
                           output_path=os.path.join(tmp, file), input_names=in_names, output_names=out_names)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'{name} could not be converted to ONNX by jax2onnx {JAX2ONNX} ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); nothing was written') from e
      finally:
        for q, level in zip(quiet, levels):
          q.setLevel(level)
      out_specs = stablehlo._flat_specs(outputs, batch=True)  # pylint: disable=protected-access
      signature['functions'][name] = {
          'file': file, 'inputs': stablehlo._flat_specs(serving.inputs, batch=True),  # pylint: disable=protected-access
          'outputs': {output_name(k, in_names): v for k, v in out_specs.items()},
          'tolerance': {'atol': atol, 'rtol': rtol},
          **({'constraints': list(serving.constraints)} if serving.constraints else {}), **serving.notes}
    stablehlo.write_alongside(tmp, reference, signature, config, workdir)

    # Verification: onnxruntime runs each file on the reference inputs, all of them and the first alone.
    for name, (inputs, want) in reference.items():
      in_names = stablehlo.flatten(inputs)[0]
      for label, take in (('', slice(None)), (' on the first example alone', slice(0, 1))):
        try:
          got = run(tmp, name, jax.tree.map(lambda x, take=take: x[take], inputs))
        except Exception as e:  # pylint: disable=broad-except  (onnxruntime's own errors)
          raise UserError(f'onnxruntime cannot run the ONNX conversion of {name} ({str(e).splitlines()[0]}); '
                          f'nothing was written') from e
        wanted = jax.tree.map(lambda x, take=take: x[take], want)
        stablehlo.check_reproduces('ONNX export', name, wanted,
                                   {k: got[output_name(k, in_names)] for k in stablehlo.flatten(want)[0]},
                                   atol, rtol, label)
  print(f'exported {", ".join(f"{n}.onnx" for n in functions)} (verified with onnxruntime on '
        f'{stablehlo.NUM_EXAMPLES} eval examples, atol {atol}, rtol {rtol})', flush=True)
  return outdir


def session(path: str):
  """An onnxruntime session on the CPU of the ONNX file `path`."""
  _, ort = libraries()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run(outdir: str, name: str, inputs: dict) -> dict:
  """Function `name` of an ONNX export on `inputs` (nested as the function's), through onnxruntime.
  -> {ONNX output name: numpy array}."""
  sess = session(os.path.join(outdir, f'{name}.onnx'))
  names, leaves, _ = stablehlo.flatten(inputs)
  out = sess.run(None, dict(zip(names, leaves)))
  return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), out)}
