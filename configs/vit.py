"""Vision Transformer (Dosovitskiy et al., 2020). Presets by size: tiny (CPU default, digits), small, base.

  python train.py --config=configs/vit.py --workdir=runs/vit                        # digits, offline, ~2.5 min
  python eval.py  --config=configs/vit.py --workdir=runs/vit
  python train.py --config=configs/vit.py:size=small --config.model.patch_size=4    # cifar10 (TFDS), 64 patches of 4x4
  python train.py --config=configs/vit.py --config.dataset.name=mnist --config.model.patch_size=4

small and base have the paper's shapes (ViT-S/16 as in DeiT, ViT-B/16), patches of 16 for 224x224 images;
on 32x32 CIFAR-10 set a smaller patch_size. Augmentation (training only): dataset.augment '' | crop |
crop_flip, dataset.crop_padding pixels.
"""
from model_zoo.config import base_config, options

# num_layers, d_model, num_heads, d_ff, patch_size
PRESETS = {
    'tiny': (3, 64, 2, 256, 2),       # 8x8 digits: 16 patches of 2x2
    'small': (12, 384, 6, 1536, 16),
    'base': (12, 768, 12, 3072, 16),
}


def get_config(arg: str = ''):
  size = options(arg, 'configs/vit.py', size=PRESETS)['size']
  num_layers, d_model, num_heads, d_ff, patch_size = PRESETS[size]
  tiny = size == 'tiny'
  config = base_config()
  config.dataset.name = 'digits' if tiny else 'cifar10'
  config.dataset.augment = 'crop' if tiny else 'crop_flip'
  config.dataset.crop_padding = 1 if tiny else 4

  config.model.name = 'vit'
  config.model.patch_size = patch_size
  config.model.d_model = d_model
  config.model.num_layers = num_layers
  config.model.num_heads = num_heads
  config.model.d_ff = d_ff
  config.model.pool = 'mean' if tiny else 'cls'   # cls (the class token) | mean (over the patches)
  config.model.dropout_rate = 0.05 if tiny else 0.0
  config.model.scan_layers = False            # True: one nn.scan over the blocks
  config.model.remat_policy = 'none'          # none | full | dots | qkv | attention | attention_mlp

  config.batch_size = 64 if tiny else 512
  config.num_train_steps = 3000 if tiny else 30_000
  config.log_every_steps = 100
  config.eval_every_steps = 1000 if tiny else 3000
  config.checkpoint_every_steps = 1000 if tiny else 3000
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-3 if tiny else 1e-3
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 200 if tiny else 3000
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 0.0 if tiny else 1.0
  config.lock()
  return config
