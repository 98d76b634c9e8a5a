"""Fine-tuning: a new model starts from the backbone of a pretrained one.

  config.init_from = 'runs/bert'        the latest checkpoint of one of our workdirs
  config.init_from = 'hf:/path/to/dir'  a Hugging Face BERT or GPT-2 directory (model_zoo.transfer.hf);
                                        the model's shape and tokenizer are then taken from it
  config.freeze = 'backbone'            only the parameters that init_from did not provide train

A parameter belongs to a head when a module on its path is named `*_head`, and to a LoRA adapter
when one is named `*_lora_*` (models.bert.is_head). A fresh run takes every other parameter from
init_from, which must hold it with the same shape. Heads and adapters are taken too where
init_from has them with the same shape (a Hugging Face BERT's pooler), and start from their
initialisation otherwise. What init_from holds beyond that (a pretraining head) is left out. Once
the run has checkpoints of its own, it resumes from those and init_from's weights are not read again.
"""
import os

import jax
import ml_collections
import numpy as np

from model_zoo.data import text
from model_zoo.errors import UserError
from model_zoo.models.bert import is_head
from model_zoo.training.optimizers import path_names


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config to build: with init_from='hf:<dir>', config.model's shape fields, the vocabulary
  size and the tokenizer come from that directory (overriding the config file's)."""
  if not config.init_from.startswith('hf:'):
    return config
  from model_zoo.transfer import hf  # pylint: disable=g-import-not-at-top
  directory = config.init_from[3:]
  fields = hf.model_config(directory)
  name, vocab_size = fields.pop('name'), fields.pop('vocab_size')
  if config.model.name != name:
    raise UserError(f'{directory} holds a {name} model but config.model.name={config.model.name!r}; '
                    f'use a config for {name}')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in fields.items():
      config.model[key] = value
    config.dataset.tokenizer = config.init_from
    config.dataset.vocab_size = vocab_size
  return config


def frozen_fn(config: ml_collections.ConfigDict):
  """For the optimizer: path -> True where the parameter must not train, or None (all train)."""
  return (lambda path: not is_head(path)) if config.freeze == 'backbone' else None


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str):
  """A fine-tuning run from one of our workdirs uses that run's SentencePiece tokenizer: it is
  copied into `workdir` before the data is read (so no new one is trained)."""
  source = config.init_from
  if not source or source.startswith('hf:') or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return  # nothing to start from, or a run that resumes from its own checkpoints
  if not os.path.isdir(os.path.join(source, 'checkpoints')):
    raise UserError(f'config.init_from={source!r} is not a workdir with checkpoints: train it first, or give '
                    f"'hf:<directory>' for Hugging Face weights")
  source_path, path = os.path.join(source, 'tokenizer.model'), os.path.join(workdir, 'tokenizer.model')
  if not os.path.exists(source_path):
    return
  with open(source_path, 'rb') as f:
    wanted = f.read()
  if os.path.exists(path):
    with open(path, 'rb') as f:
      if f.read() != wanted:
        raise UserError(f'{path} is not the tokenizer of config.init_from={source!r}: this workdir was started '
                        f'from something else; use a new --workdir')
    return
  os.makedirs(workdir, exist_ok=True)
  text.write_atomically(path, wanted)  # every process may do this: each writes the same bytes


def _source_params(init_from: str, model_name: str) -> dict:
  if init_from.startswith('hf:'):
    from model_zoo.transfer import hf  # pylint: disable=g-import-not-at-top
    return hf.load_params(init_from[3:], model_name)
  from model_zoo.training.checkpoints import Checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = Checkpoints(os.path.join(init_from, 'checkpoints'))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f'config.init_from={init_from!r} has no checkpoint yet: train it first')
    return ckpt.restore_params(step)
  finally:
    ckpt.close()


def initial_params(config: ml_collections.ConfigDict, params):
  """`params` (a fresh initialisation) with every non-head parameter taken from config.init_from."""
  source = {path_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(_source_params(
      config.init_from, config.model.name))[0]}
  missing, mismatched, taken = [], [], set()

  def take(keys, value):
    path = path_names(keys)
    fits = path in source and tuple(source[path].shape) == tuple(value.shape)
    if is_head(path) and not fits:
      return value
    if path not in source:
      missing.append('/'.join(path))
      return value
    if not fits:
      mismatched.append(f'{"/".join(path)}: {tuple(source[path].shape)} there, {tuple(value.shape)} here')
      return value
    taken.add(path)
    return np.asarray(source[path], value.dtype)

  params = jax.tree_util.tree_map_with_path(take, jax.device_get(params))
  if missing or mismatched:
    first = f'{missing[0]} is not there' if missing else f'shape of {mismatched[0]}'
    raise UserError(f'config.init_from={config.init_from!r} does not hold this model\'s backbone '
                    f'({len(missing)} parameters missing, {len(mismatched)} of another shape; first: {first}). '
                    f'Use the same model shape as the pretrained one')
  new = [p for p in (path_names(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0])
         if is_head(p) and p not in taken]
  if config.freeze == 'backbone' and not new:
    raise UserError(f'config.freeze=backbone would train nothing: every parameter of {config.model.name!r} comes '
                    f'from config.init_from (it has no new head, and model.lora_rank adds no adapters)')
  heads = sorted({part for p in new for part in p if part.endswith('_head')})
  lora = sum(any('_lora_' in part for part in p) for p in new)
  print(f'init_from {config.init_from}: {len(taken)} arrays restored; new: {", ".join(heads) or "no head"}'
        f'{f" and {lora} LoRA arrays" if lora else ""}', flush=True)
  return params
