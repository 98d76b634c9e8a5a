"""Export of a trained model for inference: LoRA adapters merged, one safetensors file.

  python eval.py --config=configs/bert_finetune.py --workdir=runs/cls --mode=export [--output=DIR]

writes DIR (default <workdir>/export): `model.safetensors` (parameters by path, such as
'block_0/self_attention/query/kernel'), `config.json` (the config to build the model, with
lora_rank 0) and the tokenizer file if the run has one. A BERT masked-LM or a GPT-2-shaped GPT is
also written in Hugging Face's format to DIR/hf (model_zoo.transfer.hf.save).

Merging (Hu et al., 2021, sec. 4.1): W' = W + (alpha / r) A B, so the exported model computes
exactly what the adapted one did, with no extra cost per token. A quantized model (eval.py
--quantize) is written with its int weights and scales, and config.json says how it was quantized.
A pruned model (config.pruning) is also written sparse, as Han et al. (2016) count its size:
`sparse.safetensors`, each pruned tensor as `<path>/values` (its non-zeros) and `<path>/bitmask`
(np.packbits of w != 0), and `sparsity.json` (dense_bytes, sparse_bytes, sparsity overall and by layer,
the shapes that model_zoo.compression.pruning.from_sparse needs).
With several processes, where the parameters may span hosts (mesh.fsdp), every process gathers them
(process_allgather) and process 0 alone writes.
"""
import json
import os

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from model_zoo import paths
from model_zoo.errors import UserError
from model_zoo.models import protocol
from model_zoo.models.protocol import is_lora
from model_zoo.workdir import Workdir


def to_host(tree):
  """Host numpy copies of a tree of global arrays, gathered from every process where they span several
  (parameters sharded over hosts): each process gets the whole tree."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def merge_lora(params: dict, alpha: float) -> dict:
  """The parameters with every `<proj>_lora_a`/`<proj>_lora_b` pair folded into `<proj>/kernel`."""
  flat = traverse_util.flatten_dict(to_host(params))
  out = {k: np.asarray(v) for k, v in flat.items() if not is_lora(k)}
  for key in flat:
    if len(key) >= 2 and key[-2].endswith('_lora_a'):
      proj = key[-2][:-len('_lora_a')]
      a, b = np.asarray(flat[key]), np.asarray(flat[key[:-2] + (f'{proj}_lora_b', 'kernel')])
      rank = a.shape[-1]
      kernel = key[:-2] + (proj, 'kernel')
      out[kernel] = out[kernel] + (alpha / rank) * np.tensordot(a, b, axes=1).astype(out[kernel].dtype)
  return traverse_util.unflatten_dict(out)


def check_output(outdir):
  outdir = paths.path(outdir)
  if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
    raise UserError(f'--output={outdir} exists and is not empty; give a new directory')


def export(config: ml_collections.ConfigDict, params, workdir: Workdir, outdir: str) -> str:
  """Writes the inference artifact of `params` (see the module doc) to `outdir`; returns it.
  Quantized params (config.quantization.mode='ptq') are written as stored: `<path>/qvalue` (int8, or
  int4 packed two to a byte, low nibble first) and `<path>/scale` (model_zoo.compression.quantization)."""
  check_output(outdir)
  quantized = config.quantization.mode == 'ptq'
  if quantized:
    from model_zoo.compression import quantization  # pylint: disable=g-import-not-at-top
    merged = jax.tree.map(np.asarray, quantization.to_storage(to_host(params)))
  elif config.model.get('lora_rank', 0):
    merged = merge_lora(params, config.model.lora_alpha)
  else:
    merged = to_host(params)
  if jax.process_index() == 0:   # every process gathered the parameters; one writes them, whole or not at all
    with paths.staged_directory(outdir) as tmp:
      _write(config, merged, quantized, workdir, tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('model_zoo: export written')
  return outdir


def _write(config: ml_collections.ConfigDict, merged: dict, quantized: bool, workdir: Workdir, outdir: str):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  merged = protocol.to_layout(merged, 'unrolled')   # scanned blocks written as block_<i>, like every export
  flat = {'/'.join(k): np.ascontiguousarray(v) for k, v in traverse_util.flatten_dict(merged).items()}
  save_file(flat, os.path.join(outdir, 'model.safetensors'))
  if config.pruning.method != 'none' and not quantized:
    from model_zoo.compression import pruning  # pylint: disable=g-import-not-at-top
    names = ['/'.join(k) for k in pruning.pruned_paths(merged, config.pruning.params)]
    stored, sizes = pruning.to_sparse(flat, set(names))
    save_file(stored, os.path.join(outdir, 'sparse.safetensors'))
    sparsity, by_layer = pruning.measured_sparsity(merged, config.pruning.params)
    with open(os.path.join(outdir, 'sparsity.json'), 'w') as f:
      json.dump({**sizes, 'sparsity': sparsity, 'shapes': {n: list(flat[n].shape) for n in names},
                 'sparsity_by_layer': by_layer}, f, indent=2)
    print(f'pruned weights at sparsity {sparsity:.4f}: {sizes["sparse_bytes"]} bytes stored sparse '
          f'(values + bitmask), {sizes["dense_bytes"]} dense', flush=True)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if 'lora_rank' in config.model:
      config.model.lora_rank = 0
    if 'scan_layers' in config.model:
      config.model.scan_layers = False
    config.init_from, config.freeze = '', 'none'
  with open(os.path.join(outdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  if workdir.tokenizer.exists():
    paths.copy_file(workdir.tokenizer, os.path.join(outdir, workdir.tokenizer.name))
  if not quantized and ((config.model.name == 'bert' and 'mlm_head' in merged) or config.model.name == 'gpt'):
    from model_zoo.transfer import hf  # pylint: disable=g-import-not-at-top
    try:
      hf.save(os.path.join(outdir, 'hf'), merged, dict(config.model))
    except UserError as e:
      print(f'not written in Hugging Face format: {e}', flush=True)


def load(outdir: str) -> tuple[dict, dict]:
  """(params, config dict) of an exported model."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(outdir, 'config.json')) as f:
    config = json.load(f)
  flat = load_file(os.path.join(outdir, 'model.safetensors'))
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()}), config
