"""MLP-Mixer (Tolstikhin et al., 2021). Presets by size: tiny (CPU default, digits), s16, b16.

  python train.py --config=configs/mixer.py --workdir=runs/mixer                    # digits, offline, ~1 min
  python eval.py  --config=configs/mixer.py --workdir=runs/mixer
  python train.py --config=configs/mixer.py --workdir=runs/mixer_69 --config.init_from=runs/mixer \\
      --config.dataset.classes=6,7,8,9 --config.freeze=backbone                    # a new 4-class head
  python train.py --config=configs/mixer.py:size=s16 --config.model.patch_size=4   # cifar10 (TFDS)

s16 and b16 have the paper's shapes (Mixer-S/16, Mixer-B/16: patches of 16 for 224x224 images);
on 32x32 CIFAR-10 set a smaller patch_size.
"""
from model_zoo.config import base_config, options

# num_layers, d_model, token_mlp_dim, channel_mlp_dim, patch_size
PRESETS = {
    'tiny': (4, 64, 64, 256, 2),        # 8x8 digits: 16 patches of 2x2
    's16': (8, 512, 256, 2048, 16),
    'b16': (12, 768, 384, 3072, 16),
}


def get_config(arg: str = ''):
  size = options(arg, 'configs/mixer.py', size=PRESETS)['size']
  num_layers, d_model, token_mlp_dim, channel_mlp_dim, patch_size = PRESETS[size]
  tiny = size == 'tiny'
  config = base_config()
  config.dataset.name = 'digits' if tiny else 'cifar10'
  config.dataset.augment = 'crop' if tiny else 'crop_flip'
  config.dataset.crop_padding = 1 if tiny else 4

  config.model.name = 'mixer'
  config.model.patch_size = patch_size
  config.model.d_model = d_model
  config.model.num_layers = num_layers
  config.model.token_mlp_dim = token_mlp_dim
  config.model.channel_mlp_dim = channel_mlp_dim

  config.batch_size = 64 if tiny else 512
  config.num_train_steps = 1500 if tiny else 30_000
  config.log_every_steps = 100
  config.eval_every_steps = 500 if tiny else 3000
  config.checkpoint_every_steps = 500 if tiny else 3000
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-3 if tiny else 1e-3
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 100 if tiny else 3000
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.lock()
  return config
