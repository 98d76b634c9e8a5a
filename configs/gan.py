"""DCGAN on the offline `digits` data; eval scores samples with a CNN classifier.

  python train.py --config=configs/gan.py --workdir=runs/gan
  python eval.py  --config=configs/gan.py --workdir=runs/gan      # samples.png, confident_share, class_spread
  python train.py --config=configs/gan.py --workdir=runs/gan_mnist --config.dataset.name=mnist

`config.optimizer` trains the generator, `config.discriminator_optimizer` the discriminator;
`--config.classifier_workdir=runs/cnn` scores samples with a classifier trained elsewhere.
"""
from configs import cnn
from model_zoo.config import base_config


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
  # The classifier that scores samples: configs/cnn.py on this config's data set, the run in
  # classifier_workdir ('' = <workdir>/classifier), which eval.py trains first if it has no checkpoint.
  config.classifier = cnn.get_config()
  config.classifier_workdir = ''
  # The generator is the model a GAN deploys: quantization leaves the discriminator float.
  config.quantization.modules = r'generator/(.*/)?block_\d+(/.*)?'
  config.lock()
  return config
