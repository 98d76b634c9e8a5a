"""MLP autoencoder with squared-error loss on the offline `digits` data.

  python train.py --config=configs/autoencoder.py --workdir=runs/autoencoder
  python eval.py  --config=configs/autoencoder.py --workdir=runs/autoencoder   # mse; reconstructions.png, interpolation.png
  python train.py --config=configs/autoencoder.py --workdir=runs/ae_mnist --config.dataset.name=mnist
"""
from model_zoo.config import base_config


def get_config():
  config = base_config()
  config.task = 'autoencoder'
  config.model.name = 'autoencoder'
  config.model.latent_dim = 16
  config.model.hidden_sizes = (256, 128)   # the encoder's; the decoder mirrors them
  config.batch_size = 128
  config.num_train_steps = 3000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 100
  config.lock()
  return config
