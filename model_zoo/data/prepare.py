"""Tokenizes a language-modelling corpus once into a prepared directory (model_zoo.data.prepared).

  python -m model_zoo.data.prepare --config=configs/gpt.py --config.dataset.name=stdlib --output=data/stdlib
  python train.py --config=configs/gpt.py --config.dataset.name=stdlib --config.dataset.prepared=data/stdlib
  python -m model_zoo.data.prepare --config=configs/gpt.py --input=my_texts/ --output=data/mine   # any text files
  python train.py --config=configs/gpt.py --config.dataset.name=prepared --config.dataset.prepared=data/mine

The config's dataset block says what to read (dataset.name, or --input, a directory whose every file is one
document, ~5% of them in validation by a hash of the path) and how to tokenize it (dataset.tokenizer,
dataset.vocab_size; SentencePiece is trained on the train split). One process, offline; nothing is written
unless the whole directory is.
"""
from absl import flags

from model_zoo import cli

OUTPUT = flags.DEFINE_string('output', None, 'The new directory of the prepared corpus.')
INPUT = flags.DEFINE_string('input', None, 'A directory of text files to prepare instead of config.dataset.name.')


def main(config, workdir):
  del workdir
  from model_zoo.data import prepared, registry  # pylint: disable=g-import-not-at-top
  from model_zoo.errors import UserError  # pylint: disable=g-import-not-at-top
  if not OUTPUT.value:
    raise UserError('--output=DIR is required: the directory to write the prepared corpus into')
  d = config.dataset
  if d.get('prepared'):
    raise UserError(f'config.dataset.prepared={d.prepared} is set: prepare reads the corpus itself; unset it')
  splits = list(dict.fromkeys([d.train_split, d.eval_split]))
  if INPUT.value:
    with d.unlocked():
      d.name = 'prepared'
    documents, source = (lambda split: prepared.text_files(INPUT.value, split)), f'files:{INPUT.value}'
  else:
    registry.check_name(d)
    loader = {'pydoc': 'pydoc', 'stdlib': 'stdlib', 'lm1b': 'lm1b'}.get(d.name)
    if loader is None:
      raise UserError(f'config.dataset.name={d.name!r} is not a language-modelling corpus; prepare reads pydoc, '
                      f'stdlib or lm1b, or a directory of text files (--input)')
    from model_zoo.data import text  # pylint: disable=g-import-not-at-top
    documents, source = (lambda split: getattr(text, loader)(d, split)), d.name
  index = prepared.write(OUTPUT.value, d, documents, splits, source)
  sizes = ', '.join(f'{split} {v["tokens"]:,} tokens' for split, v in index['splits'].items())
  print(f'wrote {OUTPUT.value}: {sizes}; train with --config.dataset.prepared={OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)
