"""The host input rate of language-model training: rows/s and tokens/s of packed rows through the real
training pipeline (model_zoo.data.pipeline.train_iterator: shuffle, process shard, batch), pinned to one core.

  python benchmarks/input_rate.py [--seq_len=1024] [--batch_size=256] [--seconds=10]

Three sources: the `stdlib` corpus (the running Python's standard library, SentencePiece vocab 4096 trained
on its train split: long documents) as a token array in memory (what a run that tokenizes at start-up reads)
and prepared (`python -m model_zoo.data.prepare`: ArrayRecord records of 8192 tokens, read a record or two a
row), and a stream of 30-token documents (lm1b's sentences are ~27 tokens), ~34 document boundaries a row.
The goal: 8 x 550k tokens/s per host, what eight GPUs training the 124m preset at the speed goal consume.
Writes benchmarks/results/input_rate.{json,md}. Not a test.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from model_zoo.data import packing, pipeline, prepared, registry, text  # pylint: disable=wrong-import-position
from model_zoo.data.base import Dataset, Files  # pylint: disable=wrong-import-position

GOAL = 8 * 550_000


def stdlib_stream(cache_dir: str) -> np.ndarray:
  config = common.load('gpt.py', {'dataset.name': 'stdlib'}).dataset
  files = Files(tokenizer=os.path.join(cache_dir, 'tokenizer.model'),
                new_tokenizer=os.path.join(cache_dir, 'tokenizer.model'),
                encoded=lambda name: os.path.join(cache_dir, f'{name}.npy'),
                new_encoded=lambda name: os.path.join(cache_dir, f'{name}.npy'))
  return registry.load(config, 'train', files).source.stream


def stdlib_prepared(cache_dir: str) -> str:
  """The stdlib corpus prepared (python -m model_zoo.data.prepare) with the same tokenizer, once."""
  output = os.path.join(cache_dir, 'prepared')
  if not os.path.exists(output):
    config = common.load('gpt.py', {'dataset.name': 'stdlib'}).dataset
    with config.unlocked():
      config.prepared = ''
    prepared.write(output, config, lambda split: text.stdlib(config, split), ['train', 'validation'], 'stdlib')
  return output


def rate(source, seq_len: int, batch_size: int, seconds: float) -> dict:
  data = Dataset(source if isinstance(source, packing.PackedRows) else packing.PackedRows(source, seq_len),
                 lambda ex: ex)
  stream = data.source.stream
  it = pipeline.train_iterator(data, batch_size=batch_size, seed=0, process_index=0, process_count=1)
  next(it)   # the first batch starts the reader threads
  start, rows = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    batch = next(it)
    rows += batch['inputs'].shape[0]
  elapsed = time.perf_counter() - start
  return {'rows_per_sec': rows / elapsed, 'tokens_per_sec': rows * seq_len / elapsed,
          'us_per_row': 1e6 * elapsed / rows, 'documents_per_row': len(data.source.doc_starts) / len(data.source),
          'tokens': int(len(stream)), 'goal_tokens_per_sec': GOAL}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'model_zoo_input_rate'))
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'input_rate'))
  args = parser.parse_args()
  os.makedirs(args.cache, exist_ok=True)
  stdlib = stdlib_stream(args.cache)   # tokenized on every core, before the measurement
  config = common.load('gpt.py', {'dataset.name': 'stdlib', 'dataset.seq_len': args.seq_len,
                                  'dataset.prepared': stdlib_prepared(args.cache)})
  stdlib_ar = registry.load(config.dataset, 'train').source   # read from ArrayRecord, record by record
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # then one core for everything, reader threads included
  doc = np.concatenate([[1], np.arange(3, 31), [2]]).astype(np.uint16)    # BOS, 28 tokens, EOS
  streams = {'stdlib (tokens in memory)': stdlib, 'stdlib prepared (ArrayRecord)': stdlib_ar,
             '30-token documents (in memory)': np.tile(doc, len(stdlib) // len(doc))}
  rows = {}
  for name, stream in streams.items():
    rows[name] = rate(stream, args.seq_len, args.batch_size, args.seconds)
    print(name, rows[name], flush=True)
  table = '\n'.join(
      [f'Packed rows of {args.seq_len} tokens, batches of {args.batch_size}, one core, Python '
       f'{platform.python_version()}:', '',
       '| stream | documents a row | rows/s | tokens/s | µs a row | x the goal (4.4M tokens/s) |',
       '|---|---|---|---|---|---|'] +
      [f'| {n} | {r["documents_per_row"]:.1f} | {r["rows_per_sec"]:,.0f} | {r["tokens_per_sec"] / 1e6:.2f}M | '
       f'{r["us_per_row"]:.0f} | {r["tokens_per_sec"] / GOAL:.2f} |' for n, r in rows.items()])
  common.write(args.output, {**rows, 'python': platform.python_version(), 'seq_len': args.seq_len,
                             'batch_size': args.batch_size}, table)


if __name__ == '__main__':
  main()
