"""Fine-tuning: a new model starts from the backbone of a pretrained one.

  config.init_from = 'runs/bert'        the latest checkpoint of one of our workdirs
  config.init_from = 'hf:/path/to/dir'  a Hugging Face BERT or GPT-2 directory (model_zoo.transfer.hf);
                                        the model's shape and tokenizer are then taken from it
  config.freeze = 'backbone'            only the heads and LoRA adapters train

A parameter belongs to a head when a module on its path is named `*_head`, and to a LoRA adapter
when one is named `*_lora_*` (model_zoo.models.protocol), in every family. A fresh run takes every
other variable (parameters, and batch statistics where the model has them) from init_from, which
must hold it with the same shape. Heads and adapters are taken too where init_from has them with
the same shape (a Hugging Face BERT's pooler), and start from their initialisation otherwise (a
classifier for another number of classes). What init_from holds beyond that (a pretraining head) is
left out. Once the run has checkpoints of its own, it resumes from those and init_from is not read again.
"""

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from model_zoo.errors import UserError
from model_zoo.models import protocol
from model_zoo.models.protocol import is_head, is_lora, path_names
from model_zoo.workdir import Workdir


def trains_when_frozen(path: tuple[str, ...]) -> bool:
  """Heads and LoRA adapters: what `freeze='backbone'` trains and `init_from` may start afresh."""
  return is_head(path) or is_lora(path)


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
  return (lambda path: not trains_when_frozen(path)) if config.freeze == 'backbone' else None


def source_workdir(config: ml_collections.ConfigDict, workdir: Workdir) -> Workdir | None:
  """The work directory a fresh fine-tuning run starts from (its tokenizer is this run's too), after
  checking it; None without init_from, with init_from='hf:...', or when `workdir` resumes."""
  source = config.init_from
  if not source or source.startswith('hf:') or workdir.has_checkpoints():
    return None
  source = Workdir(source)
  if not source.has_checkpoints():
    raise UserError(f'config.init_from={config.init_from!r} is not a workdir with checkpoints: train it first, or give '
                    f"'hf:<directory>' for Hugging Face weights")
  if source.tokenizer_differs(workdir):
    raise UserError(f'{workdir.tokenizer} is not the tokenizer of config.init_from={config.init_from!r}: this '
                    f'workdir was started from something else; use a new --workdir')
  return source


def _variables_of_state(state: dict) -> dict:
  """The model variables in a saved train state: {'params', 'model_state': {...}}, or a dict of such
  states, one per sub-model (a GAN's generator and discriminator)."""
  if 'params' in state:
    return {'params': state['params'], **state.get('model_state', {})}
  parts = {name: _variables_of_state(sub) for name, sub in state.items() if isinstance(sub, dict)}
  collections = {c for v in parts.values() for c in v}
  return {c: {name: v[c] for name, v in parts.items() if c in v} for c in collections}


class HostArrays:
  """Pretrained variables held on the host (a Hugging Face directory's weights, read by every process): each
  placed into its target sharding, a process putting only its own shards on its devices."""

  def __init__(self, variables: dict):
    self.arrays = {path_names(k): v for k, v in traverse_util.flatten_dict(variables).items()}

  def shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in self.arrays.items()}

  def read(self, wanted: dict) -> dict:
    return {k: jax.make_array_from_callback(s.shape, s.sharding,
                                            lambda index, a=self.arrays[k], d=s.dtype: np.asarray(a[index], d))
            for k, s in wanted.items()}


class CheckpointVariables:
  """The variables of a workdir's latest checkpoint: their shapes from its metadata, and a partial restore of
  the ones wanted (never the optimizer state) straight into their target shardings."""

  def __init__(self, init_from: str):
    from model_zoo.training.checkpoints import Checkpoints  # pylint: disable=g-import-not-at-top
    self.ckpt = Checkpoints(Workdir(init_from).checkpoints)
    try:   # the manager is needed for the metadata only: restore_partial reads the step's files itself
      self.step = self.ckpt.latest_step()
      if self.step is None:
        raise UserError(f'config.init_from={init_from!r} has no checkpoint yet: train it first')
      saved = self.ckpt.saved_tree(self.step)
    finally:
      self.ckpt.close()
    # Each variable's path in the saved state: the state's tree with its own paths as leaves, rearranged.
    flat = traverse_util.flatten_dict(saved)
    at = traverse_util.unflatten_dict({k: k for k in flat})
    self.state_path = {path_names(k): v for k, v in traverse_util.flatten_dict(_variables_of_state(at)).items()}
    self._shapes = {k: tuple(flat[v].shape) for k, v in self.state_path.items()}

  def shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    return self._shapes

  def read(self, wanted: dict) -> dict:
    if not wanted:
      return {}
    abstract = traverse_util.unflatten_dict({self.state_path[k]: s for k, s in wanted.items()})
    restored = traverse_util.flatten_dict(self.ckpt.restore_partial(self.step, abstract))
    return {k: restored[self.state_path[k]] for k in wanted}


def _source_variables(init_from: str, model_name: str):
  if init_from.startswith('hf:'):
    from model_zoo.transfer import hf  # pylint: disable=g-import-not-at-top
    return HostArrays({'params': hf.load_params(init_from[3:], model_name)})
  return CheckpointVariables(init_from)


def initial_variables(config: ml_collections.ConfigDict, variables: dict) -> dict:
  """`variables` (a fresh initialisation, global arrays) with every variable but new heads taken from
  config.init_from, each read into the sharding of the fresh one it replaces: nothing is gathered onto one
  host or device, so this works where the parameters span hosts."""
  source = _source_variables(config.init_from, config.model.name)
  shapes = source.shapes()
  # Blocks scanned on one side and unrolled on the other: matched in the source's layout, returned in ours.
  ours, theirs = protocol.layout(path_names(k) for k in traverse_util.flatten_dict(variables)), protocol.layout(shapes)
  if ours is not None and theirs is not None and ours != theirs:
    converted = _initial_variables(config, protocol.to_layout(variables, theirs), source, shapes)
    return jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), protocol.to_layout(converted, ours),
                        variables)
  return _initial_variables(config, variables, source, shapes)


def _initial_variables(config, variables: dict, source, shapes: dict) -> dict:
  """initial_variables with the source's variables (`shapes` their shapes) in the layout of `variables`."""
  missing, mismatched, taken = [], [], {}
  name = lambda path: '/'.join(path[1:] if path[0] == 'params' else path)
  flat = {path_names(k): v for k, v in traverse_util.flatten_dict(variables).items()}
  for path, value in flat.items():
    fits = path in shapes and shapes[path] == tuple(value.shape)
    if trains_when_frozen(path) and not fits:
      continue
    if path not in shapes:
      missing.append(name(path))
    elif not fits:
      mismatched.append(f'{name(path)}: {shapes[path]} there, {tuple(value.shape)} here')
    else:
      taken[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
  if missing or mismatched:
    first = f'{missing[0]} is not there' if missing else f'shape of {mismatched[0]}'
    raise UserError(f'config.init_from={config.init_from!r} does not hold this model\'s backbone '
                    f'({len(missing)} parameters missing, {len(mismatched)} of another shape; first: {first}). '
                    f'Use the same model shape as the pretrained one')
  new = [p for p in flat if p[0] == 'params' and trains_when_frozen(p) and p not in taken]
  if config.freeze == 'backbone' and not new:
    raise UserError(f'config.freeze=backbone would train nothing: every parameter of {config.model.name!r} comes '
                    f'from config.init_from (it has no new head, and model.lora_rank adds no adapters)')
  heads = sorted({part for p in new for part in p if part.endswith('_head')})
  lora = sum(is_lora(p) for p in new)
  print(f'init_from {config.init_from}: {len(taken)} arrays restored; new: {", ".join(heads) or "no head"}'
        f'{f" and {lora} LoRA arrays" if lora else ""}', flush=True)
  flat.update(source.read(taken))
  return traverse_util.unflatten_dict(flat)
