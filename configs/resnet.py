"""ResNet (He et al., 2015). Presets by depth: tiny (CPU default, digits), 18, 34, 50 (CIFAR-10).

  python train.py --config=configs/resnet.py --workdir=runs/resnet                  # digits, offline, ~1 min
  python eval.py  --config=configs/resnet.py --workdir=runs/resnet
  python train.py --config=configs/resnet.py:depth=18 --workdir=runs/resnet18      # cifar10 (TFDS)
  python train.py --config=configs/resnet.py:depth=50 --config.model.stem=imagenet  # the 224x224 ImageNet stem
  python train.py --config=configs/resnet.py --config.dataset.name=fashion_mnist --config.dataset.crop_padding=2

Augmentation (training only): dataset.augment '' | crop | crop_flip; dataset.crop_padding pixels.
The digits default crops without flips (a flipped digit is another glyph); the CIFAR-10 presets flip.
"""
from model_zoo.config import base_config, options

# stage_sizes, block, width, stem
PRESETS = {
    'tiny': ((1, 1, 1), 'basic', 16, 'cifar'),
    '18': ((2, 2, 2, 2), 'basic', 64, 'cifar'),
    '34': ((3, 4, 6, 3), 'basic', 64, 'cifar'),
    '50': ((3, 4, 6, 3), 'bottleneck', 64, 'cifar'),
}


def get_config(arg: str = ''):
  depth = options(arg, 'configs/resnet.py', depth=PRESETS)['depth']
  stage_sizes, block, width, stem = PRESETS[depth]
  tiny = depth == 'tiny'
  config = base_config()
  config.dataset.name = 'digits' if tiny else 'cifar10'
  config.dataset.augment = 'crop' if tiny else 'crop_flip'
  config.dataset.crop_padding = 1 if tiny else 4

  config.model.name = 'resnet'
  config.model.stage_sizes = stage_sizes
  config.model.block = block
  config.model.width = width
  config.model.stem = stem
  config.model.bn_momentum = 0.9

  config.batch_size = 128
  config.num_train_steps = 1200 if tiny else 64_000   # CIFAR-10: ~160 epochs
  config.log_every_steps = 100
  config.eval_every_steps = 400 if tiny else 4000
  config.checkpoint_every_steps = 400 if tiny else 4000
  config.optimizer.name = 'adamw' if tiny else 'nesterov'
  config.optimizer.learning_rate = 3e-3 if tiny else 0.1
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 100 if tiny else 1000
  config.optimizer.weight_decay = 0.05 if tiny else 5e-4   # adamw's decoupled decay; L2 for nesterov
  config.lock()
  return config
