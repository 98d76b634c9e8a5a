"""Export for runtimes without Python: each inference function of a model (its task's `serving()`) as a
serialized `jax.export.Exported`, with its weights, its signature and reference inputs and outputs,
verified before it is kept.

  python eval.py --config=configs/cnn.py --workdir=runs/cnn --mode=export --format=stablehlo --output=DIR

DIR holds:
  <function>.stablehlo  `Exported.serialize()` of each function: `model.stablehlo` for a model with one
                        (classifiers, BERT), `encode`/`decode` for the autoencoder and VAE, `generate` for
                        the GAN's generator, `prefill`/`decode_step` for the decoders (GPT, the LSTM language
                        model, the Transformer), the cache an input and an output. Its arguments are the weights (in signature.json's order) and
                        then the inputs (by name, in their order); the batch dimension is symbolic ('batch'),
                        so any batch size runs; lowered for CPU and CUDA. A quantized model (--quantize) takes
                        its weights as stored, int8 or int4 two to a byte with their scales, and dequantizes
                        inside the program; a LoRA model runs its adapters; a pruned one its zeros.
  weights.safetensors   the weights by the names signature.json gives them
  signature.json        per function its file, `arguments` (weights, then inputs, the order to call it in),
                        inputs and outputs (shape with 'batch', dtype), and the tolerance it was verified to;
                        the preprocessing constants, label names and tokenizer file of the model
  reference_io.npz      `<function>/inputs/<name>` and `<function>/outputs/<name>` on a few eval examples
  config.json, and the tokenizer if the model has one

Every export verifies itself: it reads the files back, runs each function on the reference inputs (all
of them, and the first alone, a second batch size) and compares with the JAX model run directly; it
refuses, leaving nothing behind, if any output differs beyond the tolerance. It is written to a
temporary directory beside DIR and renamed into place once verified (for a DIR in an object store,
gs://..., copied there).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.models.protocol import path_names
from model_zoo.tasks.base import Input
from model_zoo.workdir import Workdir

PLATFORMS = ('cpu', 'cuda')
NUM_EXAMPLES = 4
# |got - want| <= ATOL + RTOL |want|, by the dtype the model computes in.
TOLERANCE = {'float32': (1e-5, 1e-4), 'bfloat16': (2e-2, 2e-2), 'float16': (2e-2, 2e-2)}


def flatten(tree, is_leaf=None, numpy: bool = True) -> tuple[list[str], list, object]:
  """(names, leaves, treedef) of a pytree; names join the key path with '/'; leaves as numpy arrays unless
  `numpy` is False (or `is_leaf` picks them)."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return (['/'.join(path_names(p)) for p, _ in with_paths],
          [np.asarray(x) if numpy and not (is_leaf and is_leaf(x)) else x for _, x in with_paths], treedef)


def reference_inputs(serving, data, earlier: dict, n: int = NUM_EXAMPLES) -> dict:
  """A few inputs to check `serving` on: its own `reference`, else the first `n` eval examples' values of the
  inputs the data holds and N(0, I) draws (seed 0) for the others (latents)."""
  if serving.reference is not None:
    return serving.reference(data, earlier)
  examples = [data.preprocess(data.source[i]) for i in range(min(n, len(data.source)))]
  rng = np.random.default_rng(0)
  return {name: (np.stack([np.asarray(ex[name]) for ex in examples]).astype(spec.dtype) if name in examples[0]
                 else rng.standard_normal((len(examples), *spec.shape)).astype(spec.dtype))
          for name, spec in serving.inputs.items()}


def _is_input(x) -> bool:
  return isinstance(x, Input)


def _symbolic(serving) -> dict:
  """{'batch': dim, and one per dimension an Input names} of jax.export's symbolic dimensions."""
  names = ['batch'] + sorted({d for i in jax.tree.leaves(serving.inputs, is_leaf=_is_input) for d in i.shape
                              if isinstance(d, str)} - {'batch'})
  return dict(zip(names, jax.export.symbolic_shape(', '.join(names), constraints=serving.constraints)))


def _flat_specs(tree, batch: bool) -> dict:
  """{'a/b': {'shape', 'dtype'}} of a pytree of arrays or Inputs; with `batch`, axis 0 is called 'batch'."""
  names, leaves, _ = flatten(tree, is_leaf=_is_input)
  out = {}
  for name, x in zip(names, leaves):
    shape = list(x.shape) if isinstance(x, Input) else list(np.shape(x))[1 if batch else 0:]
    out[name] = {'shape': (['batch'] if batch else []) + [d if isinstance(d, str) else int(d) for d in shape],
                 'dtype': str(np.dtype(x.dtype))}
  return out


def _preprocessing(config, info) -> dict:
  out = dict(info.meta.get('preprocessing', {}))
  tok = info.tokenizer
  if tok is not None:
    out.update({'tokenizer': os.path.basename(getattr(tok, 'path', '') or ''),
                **{k: config.dataset[k] for k in ('seq_len', 'src_len', 'tgt_len') if k in config.dataset},
                **{k: getattr(tok, k) for k in ('pad_id', 'bos_id', 'eos_id', 'mask_id')
                   if getattr(tok, k, None) is not None}})
  return out


def _as_stored(config, weights):
  """(the weights as the export stores them, the function that rebuilds them inside the program). A quantized
  model's are stored as eval.py's safetensors export stores them: int8 values, or int4 two to a byte, with scales
  (model_zoo.compression.quantization.to_storage)."""
  if config.quantization.mode != 'ptq':
    return weights, lambda tree: tree
  from model_zoo.compression import quantization  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), weights)
  return quantization.to_storage(weights), lambda tree: quantization.from_storage(tree, abstract)


def tolerance(config) -> tuple[float, float]:
  """(atol, rtol) an export of a model computing in config.model.dtype is verified to."""
  return TOLERANCE.get(config.model.get('dtype', 'float32'), TOLERANCE['bfloat16'])


def check_reproduces(export: str, name: str, want, got: dict, atol: float, rtol: float, label: str = ''):
  """Refuses (UserError) an export whose function `name` gave `got` ({flat output name: array}) where the JAX
  model gave `want` (a pytree), if any output differs beyond the tolerance."""
  for key, w in zip(*flatten(want)[:2]):
    diff = _close(got[key], w, atol, rtol)
    if diff is not None:
      raise UserError(f'the {export} of {name} does not reproduce the model: its {key!r}{label} differs by up to '
                      f'{diff:.3g} (tolerance atol {atol}, rtol {rtol}); nothing was written')


def _close(got, want, atol, rtol) -> float | None:
  """None if `got` matches `want` (exactly for integers), else the largest difference."""
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape:
    return float('inf')
  if not np.issubdtype(want.dtype, np.floating):
    return None if np.array_equal(got, want) else float(np.max(np.abs(got.astype(np.int64) - want)))
  g, w = got.astype(np.float64), want.astype(np.float64)
  return None if np.all(np.abs(g - w) <= atol + rtol * np.abs(w)) else float(np.max(np.abs(g - w)))


def write_alongside(tmp: str, reference: dict, signature: dict, config, workdir: Workdir):
  """What every export holds beside its programs: reference_io.npz, signature.json, config.json, the tokenizer."""
  np.savez(os.path.join(tmp, 'reference_io.npz'), **{
      f'{fn}/{kind}/{k}': v for fn, io in reference.items() for kind, tree in zip(('inputs', 'outputs'), io)
      for k, v in zip(*flatten(tree)[:2])})
  with open(os.path.join(tmp, 'signature.json'), 'w') as f:
    json.dump(signature, f, indent=2)
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  if workdir.tokenizer.exists():
    paths.copy_file(workdir.tokenizer, os.path.join(tmp, workdir.tokenizer.name))


def export(config: ml_collections.ConfigDict, task, variables: dict, data, workdir: Workdir, outdir: str,
           platforms: tuple[str, ...] = PLATFORMS, step: int = 0) -> str:
  """Writes, verifies and keeps the StableHLO export of `task.serving()` on `variables` in `outdir`, lowered for
  `platforms` (verified on this machine's)."""
  from model_zoo.transfer.export import check_output  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  check_output(outdir)
  functions = task.serving()
  atol, rtol = tolerance(config)
  variables = jax.device_get(variables)
  with paths.staged_directory(outdir) as tmp:
    signature = {'format': 'stablehlo', 'step': step, 'platforms': list(platforms), 'functions': {},
                 'preprocessing': _preprocessing(config, task.info),
                 'labels': list(task.info.class_names), 'weights': 'weights.safetensors'}
    stored, reference = {}, {}
    for name, serving in functions.items():
      tree, restore = _as_stored(config, serving.weights_of(variables))
      names, leaves, treedef = flatten(tree)
      # One weight array may serve several functions (the AE's encode and decode): stored once by name.
      stored.update({n: np.ascontiguousarray(x) for n, x in zip(names, leaves)})
      fn = jax.jit(lambda weights, inputs, fn=serving.fn, treedef=treedef, restore=restore: fn(
          restore(jax.tree.unflatten(treedef, weights)), inputs))
      dims = _symbolic(serving)
      input_specs = jax.tree.map(lambda i: jax.ShapeDtypeStruct(
          (dims['batch'], *(dims[d] if isinstance(d, str) else d for d in i.shape)), i.dtype),
                                 serving.inputs, is_leaf=_is_input)
      try:
        exported = jax.export.export(fn, platforms=platforms)(
            [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves], input_specs)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'{name} could not be exported to StableHLO ({type(e).__name__}: '
                        f'{str(e).splitlines()[0]})') from e
      file = f'{name}.stablehlo'
      with open(os.path.join(tmp, file), 'wb') as f:
        f.write(exported.serialize())
      inputs = reference_inputs(serving, data, reference)
      outputs = jax.device_get(fn(leaves, inputs))
      reference[name] = (inputs, outputs)
      input_names = list(_flat_specs(serving.inputs, batch=True))
      signature['functions'][name] = {
          'file': file, 'arguments': names + input_names, 'inputs': _flat_specs(serving.inputs, batch=True),
          'outputs': _flat_specs(outputs, batch=True), 'tolerance': {'atol': atol, 'rtol': rtol},
          **({'constraints': list(serving.constraints)} if serving.constraints else {}), **serving.notes}
    save_file(stored, os.path.join(tmp, 'weights.safetensors'))
    write_alongside(tmp, reference, signature, config, workdir)

    # Verification, from the files alone.
    weights = load_file(os.path.join(tmp, 'weights.safetensors'))
    for name, (inputs, want) in reference.items():
      got = run(tmp, name, weights, inputs)
      first = run(tmp, name, weights, jax.tree.map(lambda x: x[:1], inputs))
      for label, g, w in (('', got, want), (' on the first example alone', first, jax.tree.map(lambda x: x[:1], want))):
        check_reproduces('StableHLO export', name, w, dict(zip(*flatten(g)[:2])), atol, rtol, label)
  print(f'exported {", ".join(f"{n}.stablehlo" for n in functions)} (verified on {NUM_EXAMPLES} eval examples, '
        f'atol {atol}, rtol {rtol})', flush=True)
  return outdir


def run(outdir: str, name: str, weights: dict[str, np.ndarray], inputs: dict) -> dict:
  """Runs function `name` of a StableHLO export on `inputs` (a dict, nested as the function's inputs are), as any
  runtime would: the deserialized program with the weights in the order signature.json gives. -> numpy arrays."""
  return jax.device_get(program(outdir, name, weights)[0](jax.tree.map(jnp.asarray, inputs)))


def program(outdir: str, name: str, weights: dict[str, np.ndarray]):
  """Function `name` of a StableHLO export on the device, its weights bound: (`call(inputs) -> outputs`,
  `call_donating(donated, rest) -> outputs`, the same with the buffers of `donated`'s inputs given up)."""
  with open(os.path.join(outdir, 'signature.json')) as f:
    spec = json.load(f)['functions'][name]
  path = os.path.join(outdir, spec['file'])
  call, donating = _program(path, os.stat(path).st_mtime_ns)
  arguments = spec['arguments']
  given = jax.device_put([weights[a] for a in arguments[:len(arguments) - len(spec['inputs'])]])   # once
  return lambda inputs: call(given, inputs), lambda donated, rest: donating(given, donated, rest)


@functools.lru_cache(maxsize=16)
def _program(path: str, mtime_ns: int):
  """The deserialized program of `path` (plain and donating its second argument), compiled once per shape."""
  del mtime_ns  # part of the key: a rewritten file is read again
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  donating = jax.jit(lambda given, donated, rest: exported.call(given, {**donated, **rest}), donate_argnums=1)
  return jax.jit(exported.call), donating
