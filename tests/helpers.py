"""Shared by the tests: tiny configs and running the real command-line entry points."""
import json
import os
import re
import subprocess
import sys

from conftest import FAST_COMPILE, ROOT


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process of the tests with `devices` fake CPU devices."""
  return f'{FAST_COMPILE} --xla_force_host_platform_device_count={devices}'

# A small MLP run on digits that still learns: a few seconds on 2 CPU cores.
TINY = ['--config.batch_size=32', '--config.model.hidden_sizes=(32,)', '--config.num_train_steps=60',
        '--config.log_every_steps=10', '--config.eval_every_steps=30', '--config.checkpoint_every_steps=20',
        '--config.optimizer.warmup_steps=5']


def preset(name, arg=''):
  """configs/<name>.py:<arg>, as train.py reads it."""
  from model_zoo import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py' + (f':{arg}' if arg else '')))


def tiny_config(name='mlp', arg='', **overrides):
  """configs/<name>.py[:arg] made tiny, with `overrides` as dotted keys ('optimizer.name': 'sgd')."""
  config = preset(name, arg)
  defaults = {'batch_size': 32, 'num_train_steps': 30, 'log_every_steps': 10, 'eval_every_steps': 30,
              'checkpoint_every_steps': 30, 'optimizer.warmup_steps': 5,
              'optimizer.learning_rate': 1e-2}
  if name == 'mlp':
    defaults['model.hidden_sizes'] = (32,)
  if name == 'cnn':
    defaults.update({'model.features': (8, 16), 'model.dense_size': 32})
  for key, value in {**defaults, **overrides}.items():
    *path, leaf = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


# Every registered family: (config file, overrides) that make it tiny. Sizes are multiples of 8 where
# FSDP over 8 devices must split them.
FAMILIES = {
    'mlp': ('mlp', {'model.hidden_sizes': (32, 32)}),
    'cnn': ('cnn', {'model.features': (8, 16), 'model.dense_size': 32}),
    'resnet': ('resnet', {'model.stage_sizes': (1, 1), 'model.width': 8}),
    'vit': ('vit', {'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'model.d_ff': 64}),
    'mixer': ('mixer', {'model.d_model': 32, 'model.num_layers': 2, 'model.token_mlp_dim': 16,
                        'model.channel_mlp_dim': 64}),
    'rnn_lm': ('lstm', {'model.num_layers': 2, 'model.embed_size': 16, 'model.hidden_size': 32,
                        'dataset.seq_len': 16, 'batch_size': 16}),
    'rnn_classifier': ('lstm:task=classify', {'model.hidden_size': 32, 'batch_size': 16}),
    'gpt': ('gpt', {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
                    'model.max_len': 32, 'dataset.seq_len': 32, 'dataset.tokenizer': 'bytes',
                    'dataset.vocab_size': 259, 'batch_size': 16}),
    'bert': ('bert_pretrain', {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
                               'dataset.vocab_size': 400, 'dataset.seq_len': 32, 'batch_size': 16}),
    'transformer': ('transformer', {'model.num_encoder_layers': 2, 'model.num_decoder_layers': 2,
                                    'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64,
                                    'dataset.train_examples': 400, 'dataset.vocab_size': 296, 'batch_size': 16}),
    'autoencoder': ('autoencoder', {'model.latent_dim': 8, 'model.hidden_sizes': (32, 16)}),
    'vae': ('vae', {'model.latent_dim': 8, 'model.hidden_sizes': (32, 16)}),
    'dcgan': ('gan', {'model.latent_dim': 8, 'model.generator_features': 8, 'model.discriminator_features': 8,
                      'batch_size': 16}),
}


def family_config(name, **overrides):
  """The tiny config of model family `name` (a key of FAMILIES), with `overrides` as dotted keys."""
  file, tiny = FAMILIES[name]
  return tiny_config(*file.split(':'), **{**tiny, **overrides})


_DATA = {}


def family_data(config):
  """The training split of a tiny family config, loaded once per data set and shape for the whole test process."""
  from model_zoo.data import registry  # pylint: disable=g-import-not-at-top
  key = config.dataset.to_json(sort_keys=True)
  if key not in _DATA:
    _DATA[key] = registry.load(config.dataset, config.dataset.train_split)
  return _DATA[key]


def bytes_by_hand(float_params, weight_dtype) -> tuple[int, int]:
  """(bytes as stored, bytes in float) of float32 params whose top-level block_<i> kernels are quantized:
  a byte (int8) or half a byte (int4) a value, and a float32 scale per output channel."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  per_value = {'int8': lambda n: n, 'int4': lambda n: (n + 1) // 2}[weight_dtype]
  stored = 0
  for path, w in traverse_util.flatten_dict(float_params).items():
    quantized = path[0].startswith('block_') and path[-1] == 'kernel'
    stored += per_value(w.size) + 4 * w.shape[-1] if quantized else 4 * w.size
  return stored, sum(4 * w.size for w in jax.tree.leaves(float_params))


def run_cli(script, *args, devices=1, timeout=300, check=False, env=None):
  """Runs train.py or eval.py (or `-m module`) in a fresh process, as a user would (with `env` added to
  the environment)."""
  env = dict(os.environ, **(env or {}))
  env['XLA_FLAGS'] = xla_flags(devices)
  command = ['-m', *args] if script == '-m' else [os.path.join(ROOT, script), *args]
  proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc


# Measured speeds: they differ from run to run, so comparisons of two runs leave them out.
TIMINGS = ('steps_per_sec', 'tokens_per_sec', 'tflops_per_sec', 'mfu')


def saved_state(workdir, step):
  """The train state of `workdir`'s checkpoint at `step`, as nested dicts of numpy arrays."""
  from model_zoo.training.checkpoints import Checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    return ckpt.restore_tree(step)
  finally:
    ckpt.close()


def read_metrics(workdir, drop=TIMINGS):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def two_processes(workdir, args, *, script='train.py', stop_at=None):
  """Runs `script` (train.py, eval.py) as processes 0 and 1 of a jax.distributed run on 127.0.0.1, 4 CPU devices
  each; process 1 sends itself SIGTERM after step `stop_at`. -> their stdout, once both exited 0."""
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    env.pop('MODEL_ZOO_KILL_AT', None)
    if stop_at and i == 1:
      env['MODEL_ZOO_KILL_AT'] = f'step:{stop_at}:SIGTERM'
    procs.append(subprocess.Popen(
        [sys.executable, script, *args, f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err
  return [out for out, _ in outputs]


def without_gloo(out: str) -> str:
  """The output without the lines gloo prints as it connects the processes. Its threads write them at once, so
  one message can sit inside another: removing the whole ones can join the pieces of another, removed next."""
  gloo = re.compile(r'\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks '
                    r'is : \d+\n?')
  while (fewer := gloo.sub('', out)) != out:
    out = fewer
  return out
