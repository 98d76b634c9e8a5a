"""DCGAN on the offline `digits` data; eval scores samples with a CNN classifier.

  python train.py --config=configs/gan.py --workdir=runs/gan
  python eval.py  --config=configs/gan.py --workdir=runs/gan      # samples.png, confident_share, class_spread
  python train.py --config=configs/gan.py --workdir=runs/gan_mnist --config.dataset.name=mnist

`config.optimizer` trains the generator, `config.discriminator_optimizer` the discriminator.
"""
import importlib.util
import os

from model_zoo.config import base_config


def _cnn_config():
  spec = importlib.util.spec_from_file_location('cnn_config', os.path.join(os.path.dirname(__file__), 'cnn.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = base_config()
  config.task = 'gan'
  config.model.name = 'dcgan'
  config.model.latent_dim = 32
  config.model.generator_features = 64
  config.model.discriminator_features = 64
  config.model.minibatch_std = True    # D sees the batch's spread: against mode collapse

  config.batch_size = 64
  config.num_train_steps = 3000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  # Adam with beta1 = 0.5 and lr 2e-4, as DCGAN.
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1 = 0.5
  config.discriminator_optimizer = config.optimizer.copy_and_resolve_references()

  config.eval_samples = 1000
  # The classifier that scores samples: configs/cnn.py, trained on this config's data set
  # into <workdir>/classifier the first time eval.py runs.
  config.classifier = _cnn_config()
  config.lock()
  return config
