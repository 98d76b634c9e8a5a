"""Variational autoencoder (Kingma & Welling, 2013) on the offline `digits` data.

  python train.py --config=configs/vae.py --workdir=runs/vae
  python eval.py  --config=configs/vae.py --workdir=runs/vae    # elbo, kl, reconstruction (nats per example), mse;
                                                                 # reconstructions.png, samples.png, interpolation.png
  python train.py --config=configs/vae.py --workdir=runs/vae_gauss --config.likelihood=gaussian
  python train.py --config=configs/vae.py --workdir=runs/vae_mnist --config.dataset.name=mnist
"""
from model_zoo.config import base_config


def get_config():
  config = base_config()
  config.task = 'vae'
  config.model.name = 'vae'
  config.model.latent_dim = 8
  config.model.hidden_sizes = (256, 128)   # the encoder's; the decoder mirrors them
  # p(x|z): 'bernoulli' (pixels as probabilities) or 'gaussian'. On digits, bernoulli gives the more digit-like
  # prior samples and blurrier reconstructions; gaussian with std 0.25 the sharper reconstructions.
  config.likelihood = 'bernoulli'
  config.decoder_std = 0.25                # the fixed std of the 'gaussian' p(x|z)
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
