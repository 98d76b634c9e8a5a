"""MLP on the offline `digits` data.

  python train.py --config=configs/mlp.py --workdir=runs/mlp
  python train.py --config=configs/mlp.py --config.dataset.name=mnist --config.dataset.download=True
"""
from model_zoo.config import base_config


def get_config():
  config = base_config()
  config.model.name = 'mlp'
  config.model.hidden_sizes = (256, 256)
  config.model.dropout_rate = 0.2
  config.batch_size = 128
  config.num_train_steps = 1500
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 1e-4
  config.lock()
  return config
