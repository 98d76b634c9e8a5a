"""Trains any model_zoo config: python train.py --config=configs/mlp.py [--workdir=runs/mlp]."""
from model_zoo import cli


def main(config, workdir):
  from model_zoo.training import loop  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run(main)
