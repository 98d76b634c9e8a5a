"""Post-training quantization of a trained work directory: what `eval.py --quantize=SCHEME` runs.

  restored float state -> LoRA merged -> (GPTQ: H = X X^T of each layer's inputs on calibration
  batches) -> int weights and scales (model_zoo.compression.quantization) -> a checkpoint in
  <workdir>/quantized/<SCHEME>/<step>/ -> the quantized model's experiment and state

The checkpoint holds the quantized variables as stored (int8, or int4 packed two to a byte, with
their float scales; everything else float) and its metadata: the scheme, the settings of
config.quantization, the float step and, for GPTQ, the calibration batches and seed. Eval, sample,
translate and export load it when it is there, instead of quantizing again.
"""
import json

import jax
import ml_collections
import orbax.checkpoint as ocp

from model_zoo import paths
from model_zoo.compression import quantization
from model_zoo.compression.settings import scheme
from model_zoo.data import pipeline
from model_zoo.errors import UserError
from model_zoo.experiment import Experiment, Run, build_experiment
from model_zoo.models import protocol
from model_zoo.tasks import registry as task_registry
from model_zoo.training import sharding
from model_zoo.training.checkpoints import restore_on_host
from model_zoo.transfer import export as export_lib


def inference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the quantized model: LoRA merged away, and no optimizer state worth the name (the
  quantized model is evaluated, never trained), its blocks unrolled."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.model.get('lora_rank', 0):
      config.model.lora_rank = 0
    if config.model.get('scan_layers', False):   # qwix's rules match the blocks by their paths: block_<i>
      config.model.scan_layers = False
    config.init_from, config.freeze = '', 'none'
    config.loss_chunks = 0           # evaluation takes whole logits; qwix's model has no output layer of its own
    config.pruning.method = 'none'   # the pruned weights are zeros already; no masks to carry
    for key in ('optimizer', 'discriminator_optimizer'):
      if key in config:
        config[key].update(name='sgd', schedule='constant', warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0,
                           layer_decay=1.0)
  return config


def quantized_experiment(config: ml_collections.ConfigDict, info, mesh) -> Experiment:
  """The experiment of the PTQ model that `config` (quantization.mode='ptq') describes."""
  task = task_registry.build(config, info)
  task.model = quantization.quantized_model(task.model, config.quantization)
  try:
    exp = build_experiment(config, info, mesh, task=task)
  except ValueError as e:   # qwix's, for a layer it cannot quantize as asked (a tile that does not divide)
    raise UserError(f'config.quantization ({scheme(config.quantization)}, tile_size='
                    f'{config.quantization.tile_size}, modules={config.quantization.modules!r}) cannot be applied '
                    f'to this model: {str(e).splitlines()[0]}') from e
  quantization.check_matched(task.model, config.quantization, task.variables(exp.abstract_state)['params'])
  return exp


class QuantizedCheckpoints:
  """<workdir>/quantized/<scheme>/<step>/{variables, metadata}, written atomically by Orbax."""

  def __init__(self, directory):
    self.directory = paths.path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(create=False, max_to_keep=None),
        item_handlers={'variables': ocp.StandardCheckpointHandler(), 'metadata': ocp.JsonCheckpointHandler()})

  def metadata(self, step: int) -> dict | None:
    if step not in self.manager.all_steps():
      return None
    path = self.directory / str(step) / 'metadata' / 'metadata'
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UserError(f'{path} cannot be read ({type(e).__name__}); the quantized checkpoint of step {step} is '
                      f'damaged: move {self.directory / str(step)} aside to quantize again') from e

  def save(self, step: int, stored, metadata: dict):
    self.directory.mkdir(parents=True, exist_ok=True)
    self.manager.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(stored),
                                                    metadata=ocp.args.JsonSave(metadata)))
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_stored):
    try:   # on the host: the caller places them on the mesh
      return restore_on_host(self.manager, step, 'variables', abstract_stored)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'the quantized checkpoint of step {step} in {self.directory} could not be read '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); move it aside to '
                      f'quantize again') from e

  def close(self):
    self.manager.close()


def _settings(q: ml_collections.ConfigDict) -> dict:
  return {k: q[k] for k in ('weight_dtype', 'act_dtype', 'calibration', 'tile_size', 'modules')} | (
      {'calibration_batches': q.calibration_batches} if q.calibration == 'gptq' else {})


def quantize(run: Run, state, step: int, config: ml_collections.ConfigDict) -> tuple[Experiment, object, dict]:
  """-> (the quantized experiment, its state, {'weight_bytes', 'float_weight_bytes'}) of `state`, the float
  state of `run` at `step`, quantized as `config.quantization` (mode 'ptq') says."""
  config = inference_config(config)
  q, name = config.quantization, scheme(config.quantization)
  exp = quantized_experiment(config, run.experiment.task.info, run.experiment.mesh)
  float_vars = protocol.to_layout(run.experiment.task.variables(state), 'unrolled')
  params = float_vars['params']
  if run.config.model.get('lora_rank', 0):
    params = jax.tree.map(jax.numpy.asarray, export_lib.merge_lora(params, run.config.model.lora_alpha))
  abstract_vars = exp.task.variables(exp.abstract_state)
  abstract_stored = quantization.to_storage(abstract_vars)
  store = QuantizedCheckpoints(run.workdir.quantized(name))
  try:
    metadata = store.metadata(step)
    if metadata is not None:
      if metadata.get('quantization') != _settings(q):
        raise UserError(f'{store.directory}/{step} was quantized with {metadata.get("quantization")}, not with '
                        f'this config\'s {_settings(q)}; move it aside to quantize again, or use the settings '
                        f'it was made with')
      variables = quantization.from_storage(store.restore(step, abstract_stored), abstract_vars)
      print(f'using the {name} checkpoint of step {step} in {store.directory}', flush=True)
    else:
      calibration = None
      if q.calibration == 'gptq':
        stats, calibration = _calibrate(run, exp, {**float_vars, 'params': params}, config)
        qparams = quantization.gptq_quantize(params, abstract_vars['params'], stats)
      else:
        qparams = jax.jit(lambda p: quantization.quantize(p, abstract_vars['params']))(params)
      variables = {**float_vars, 'params': qparams}
      stored = quantization.to_storage(jax.device_get(variables))
      layers = quantization.quantized_layer_bytes(qparams)
      metadata = {'scheme': name, 'step': step, 'quantization': _settings(q), 'calibration': calibration,
                  'weight_bytes': quantization.stored_bytes(stored['params']),
                  'float_weight_bytes': quantization.stored_bytes(params),
                  'quantized_layers': {'weight_bytes': layers[0], 'float_weight_bytes': layers[1]}}
      store.save(step, stored, metadata)
      print(f'quantized step {step} as {name} ({metadata["weight_bytes"]} bytes of weights, '
            f'{metadata["float_weight_bytes"]} in float) into {store.directory}', flush=True)
  finally:
    store.close()
  qstate = jax.jit(lambda v: exp.task.with_variables(exp.abstract_state, v), out_shardings=exp.state_shardings)(
      variables)
  return exp, qstate, {'weight_bytes': metadata['weight_bytes'], 'float_weight_bytes': metadata['float_weight_bytes']}


def _calibrate(run: Run, exp: Experiment, variables: dict, config) -> tuple[dict, dict]:
  """GPTQ's statistics: H = X X^T of every quantized dense layer's inputs X, averaged over the first
  `calibration_batches` batches of the training split in the order training reads them (config.seed)."""
  task = exp.task
  if not hasattr(task, 'model_inputs'):
    raise UserError(f"calibration='gptq' runs the model on training batches, which the {config.task} task does "
                    f"not feed to one model; use --quantize=int4 (round to nearest)")
  model = quantization.quantized_model(task.model, config.quantization, quantization.GptqCalibration)
  split = config.dataset.train_split
  data = run.load([split])[split]
  batches = pipeline.train_iterator(data, batch_size=config.batch_size, seed=config.seed, prefetch=0)

  def step(stats, batch):
    _, updates = model.apply({**variables, 'quant_stats': stats}, *task.model_inputs(batch), train=False,
                             mutable=['quant_stats'], **task.model_kwargs(batch))
    return updates['quant_stats']
  step = jax.jit(step)
  stats = {}
  n = config.quantization.calibration_batches
  for _ in range(n):
    stats = step(stats, sharding.to_global(next(batches), exp.mesh))
  return stats, {'split': split, 'batches': n, 'batch_size': config.batch_size, 'seed': config.seed}
