"""What serve.py serves: a model's inference functions (its task's `serving()`), from a trained work directory
(model_zoo.serving.restore) or from a StableHLO export (`from_export`), behind one interface.

A `Function` runs a batch: `run({input: array [B, ...]}) -> {output: array [B, ...]}`. Each is jitted on the
restored weights (from a work directory) or is the deserialized program (from an export), so the server never
needs the task or the model class. `call_donating` is the same program for a caller that replaces some inputs
with the outputs of the call (a generator's cache): their buffers are donated, so XLA writes the outputs in
place instead of copying the whole cache every step.
"""
import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np

from model_zoo.errors import UserError
from model_zoo.tasks.base import Input


@dataclasses.dataclass
class Function:
  name: str
  inputs: dict[str, Input]          # flat input names -> one example's shape (no batch axis) and dtype
  outputs: list[str]
  call: Callable[[dict], dict]      # inputs -> outputs, on the device (a generator keeps its cache there)
  notes: dict = dataclasses.field(default_factory=dict)
  # (donated inputs, the other inputs) -> outputs: `call`, the first dict's arrays unusable afterwards.
  call_donating: Callable[[dict, dict], dict] | None = None

  def run(self, inputs: dict) -> dict:
    """`call` with the outputs as numpy arrays."""
    return jax.device_get(self.call(inputs))


@dataclasses.dataclass
class Servable:
  name: str
  version: int                      # the checkpoint's step
  functions: dict[str, Function]
  labels: list[str]
  tokenizer: object = None          # a model_zoo.data.tokenizers tokenizer, for text models

  @property
  def default(self) -> str:
    """The function `serving_default` names: 'model', or the first (the autoencoder's 'encode')."""
    return 'model' if 'model' in self.functions else next(iter(self.functions))

  @property
  def generative(self) -> bool:
    return set(self.functions) == {'prefill', 'decode_step'}


def flat_inputs(inputs) -> dict[str, Input]:
  from model_zoo.transfer import stablehlo  # pylint: disable=g-import-not-at-top
  names, leaves, _ = stablehlo.flatten(inputs, is_leaf=lambda x: isinstance(x, Input))
  return dict(zip(names, leaves))


def from_export(outdir: str, name: str) -> Servable:
  """The programs of a StableHLO export (eval.py --mode=export --format=stablehlo)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from model_zoo.transfer import stablehlo  # pylint: disable=g-import-not-at-top
  path = os.path.join(outdir, 'signature.json')
  if not os.path.exists(path):
    raise UserError(f'--export={outdir} has no signature.json: give a directory written by '
                    f'`eval.py --mode=export --format=stablehlo`')
  try:
    with open(path) as f:
      signature = json.load(f)
    weights = load_file(os.path.join(outdir, signature['weights']))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'--export={outdir} cannot be read ({type(e).__name__}: {e}); export it again') from e
  functions = {}
  for fn_name, spec in signature['functions'].items():
    inputs = {k: Input(tuple(s['shape'][1:]), np.dtype(s['dtype'])) for k, s in spec['inputs'].items()}
    notes = {k: v for k, v in spec.items() if k not in ('file', 'arguments', 'inputs', 'outputs', 'tolerance')}
    call, call_donating = stablehlo.program(outdir, fn_name, weights)
    functions[fn_name] = Function(fn_name, inputs, sorted(spec['outputs']), call, notes, call_donating)
  return Servable(name, int(signature.get('step', 1)), functions, signature.get('labels', []), _tokenizer(outdir))


def _tokenizer(outdir: str):
  """The export's tokenizer (its config.json's kind, its file), or None for a model without text."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from model_zoo.data import base, tokenizers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(outdir, 'config.json')) as f:
    dataset = json.load(f).get('dataset', {})
  if 'tokenizer' not in dataset:
    return None

  def untrained():
    raise UserError(f'{outdir} has no tokenizer file: export it again')
  return tokenizers.build(ml_collections.ConfigDict(dataset), base.Files(tokenizer=os.path.join(
      outdir, 'tokenizer.model')), untrained)
