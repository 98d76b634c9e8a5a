"""Load on serve.py: requests/s (generated tokens/s for text) and latency at 1, 8 and 32 concurrent clients,
with batching on and off.

  python benchmarks/serve_load.py [--cnn=/tmp/model_zoo_quantization/cnn] [--gpt=/tmp/model_zoo_quantization/gpt]
      [--models=cnn,gpt] [--rounds=3]

Each work directory is a trained default (`train.py --config=configs/cnn.py`, `configs/gpt.py`). For each, one
serve.py process on 127.0.0.1 per way of serving it (warmed up: every padded shape compiled), then for each
number of clients a fixed number of requests, each client a thread with its own connection, one request after
another:
  cnn  :predict of one test image a request (256 requests), batching on (--max_batch_size=32,
       --batch_timeout_ms=5) and off (--nobatching: each request alone)
  gpt  /v1/completions, greedy, 32 new tokens a request (32 requests), continuous batching over 8 slots
       (--slots=8) and one request at a time (--slots=1); prompts are the first 4 to 16 words of pydoc passages
The two ways take turns, `--rounds` times at each number of clients (both servers up, one loaded at a time), so
that a slow minute of a shared machine falls on both. Reports the median round's requests/s and generated
tokens/s (gpt), and p50 and p99 latency in ms over every round's requests; the JSON keeps each round. Writes
benchmarks/results/serve_load.{json,md}. Not a test.
"""
import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

CLIENTS = (1, 8, 32)
MODES = {'cnn': {'batching on': ['--max_batch_size=32', '--batch_timeout_ms=5'], 'batching off': ['--nobatching']},
         'gpt': {'continuous batching (8 slots)': ['--slots=8'], 'one at a time (1 slot)': ['--slots=1']}}
REQUESTS = {'cnn': 256, 'gpt': 32}
NEW_TOKENS = 32


def start(config: str, workdir: str, port: int, flags: list[str]):
  import httpx  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'serve.py'), f'--config={config}',
                           f'--workdir={workdir}', f'--port={port}', *flags], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f'serve.py exited: {proc.stderr.read()}')
    try:
      if httpx.get(f'http://127.0.0.1:{port}/healthz', timeout=1).status_code == 200:
        return proc
    except httpx.HTTPError:
      time.sleep(0.5)
  proc.kill()
  raise SystemExit('serve.py did not start in 300 s')


def payloads(name: str) -> list:
  from model_zoo import config as config_lib  # pylint: disable=g-import-not-at-top
  from model_zoo.data import registry  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py'))
  data = registry.load(config.dataset, config.dataset.eval_split)
  n = REQUESTS[name]
  if name == 'cnn':
    return [{'instances': [data.preprocess(data.source[i % len(data.source)])['image'].tolist()]} for i in range(n)]
  text = data.tokenizer.decode(np.concatenate([data.preprocess(data.source[i])['inputs'] for i in range(4)]))
  words = text.split()
  return [{'model': 'gpt', 'prompt': ' '.join(words[i * 7:i * 7 + 4 + i % 13]) + ' ', 'max_tokens': NEW_TOKENS,
           'temperature': 0} for i in range(n)]


def load(url: str, bodies: list, clients: int) -> dict:
  """`bodies` sent by `clients` threads: -> wall seconds, [(latency s, completion tokens)] a request. The clients
  are made before the clock starts (an httpx.Client takes ~20 ms of CPU to make: 32 of them would be most of a
  run's client-side work, on the cores the server runs on)."""
  import httpx  # pylint: disable=g-import-not-at-top
  chunks = [bodies[i::clients] for i in range(clients)]
  sessions = [httpx.Client(timeout=300) for _ in range(clients)]

  def client(session, chunk):
    out = []
    for body in chunk:
      start = time.perf_counter()
      r = session.post(url, json=body)
      r.raise_for_status()
      tokens = r.json().get('usage', {}).get('completion_tokens', 0)
      out.append((time.perf_counter() - start, tokens))
    return out

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    start = time.perf_counter()
    results = [x for chunk in pool.map(client, sessions, chunks) for x in chunk]
    wall = time.perf_counter() - start
  for session in sessions:
    session.close()
  return wall, results


def summary(rounds: list) -> dict:
  """The median round's throughput; latency percentiles over all rounds' requests."""
  per_sec = [len(results) / wall for wall, results in rounds]
  tokens = [sum(t for _, t in results) / wall for wall, results in rounds]
  latency = np.array([s for _, results in rounds for s, _ in results]) * 1000
  return {'requests': sum(len(r) for _, r in rounds), 'rounds_requests_per_sec': per_sec,
          'requests_per_sec': float(np.median(per_sec)), 'tokens_per_sec': float(np.median(tokens)) or None,
          'rounds_tokens_per_sec': tokens if any(tokens) else None,
          'p50_ms': float(np.percentile(latency, 50)), 'p99_ms': float(np.percentile(latency, 99))}


def table(rows: dict) -> str:
  lines = ['| model | serving | clients | requests/s | generated tokens/s | p50 ms | p99 ms |', '|---|---|---|---|---|---|---|']
  def order(key):
    name, mode, clients = key.split('|')
    return list(MODES).index(name), list(MODES[name]).index(mode), int(clients)
  for key, r in sorted(rows.items(), key=lambda kv: order(kv[0])):
    name, mode, clients = key.split('|')
    tokens = f'{r["tokens_per_sec"]:.1f}' if r['tokens_per_sec'] else ''
    lines.append(f'| {name} | {mode} | {clients} | {r["requests_per_sec"]:.1f} | {tokens} | {r["p50_ms"]:.1f} | '
                 f'{r["p99_ms"]:.1f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cnn', default='/tmp/model_zoo_quantization/cnn')
  parser.add_argument('--gpt', default='/tmp/model_zoo_quantization/gpt')
  parser.add_argument('--models', default='cnn,gpt', help='which of cnn, gpt to load')
  parser.add_argument('--port', type=int, default=18600)
  parser.add_argument('--rounds', type=int, default=3, help='turns each way of serving takes at each load')
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'serve_load'))
  args = parser.parse_args()
  models = args.models.split(',')
  if set(models) - set(MODES) or args.rounds < 1:
    raise SystemExit(f'--models={args.models} --rounds={args.rounds}: give some of {", ".join(MODES)}, rounds >= 1')
  rows = {}
  for name, workdir in ((m, getattr(args, m)) for m in models):
    bodies = payloads(name)
    path = '/v1/models/cnn:predict' if name == 'cnn' else '/v1/completions'
    procs, urls = [], {}
    try:
      for i, (mode, flags) in enumerate(MODES[name].items()):
        procs.append(start(f'configs/{name}.py', workdir, args.port + i, flags))
        urls[mode] = f'http://127.0.0.1:{args.port + i}{path}'
        load(urls[mode], bodies[:8], 1)   # the first requests after start-up
      for clients in CLIENTS:
        rounds = {mode: [] for mode in urls}
        for _ in range(args.rounds):
          for mode, url in urls.items():
            rounds[mode].append(load(url, bodies, clients))
        for mode in urls:
          rows[f'{name}|{mode}|{clients}'] = summary(rounds[mode])
        common.write(args.output, rows, table(rows))
    finally:
      for proc in procs:
        proc.send_signal(signal.SIGTERM)
      for proc in procs:
        proc.wait(60)


if __name__ == '__main__':
  main()
