"""Evaluates a trained workdir: python eval.py --config=configs/mlp.py --workdir=runs/mlp [--step=N].

Writes <workdir>/eval.json and PNG plots next to it.
"""
from absl import flags

from model_zoo import cli

STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate; default the latest.')


def main(config, workdir):
  from model_zoo.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.evaluate(config, workdir, STEP.value)


if __name__ == '__main__':
  cli.run(main)
