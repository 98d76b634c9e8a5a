"""serve.py as a user runs it: a real server process on 127.0.0.1, real HTTP clients (httpx), TF Serving's REST
API. Predictions equal the model's own in this process; concurrent clients are batched; every bad request is a
4xx naming the problem and the server goes on; the API key; SIGTERM finishes the request in flight and exits 0."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import portpicker
import pytest

from conftest import ROOT
from helpers import family_config, family_data, tiny_config, xla_flags
from model_zoo.data import registry
from model_zoo.evaluation import evaluate
from model_zoo.serving import server as server_lib
from model_zoo.serving.servable import Function, Servable
from model_zoo.tasks.base import Input
from model_zoo.training import loop

KEY = 'test-key'
AUTH = {'Authorization': f'Bearer {KEY}'}


def _config():
  return tiny_config('mlp')


def _start(*args, env_key=None):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  if env_key:
    env['MODEL_ZOO_API_KEY'] = env_key
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'serve.py'), *args, f'--port={port}'], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 120
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'serve.py exited {proc.returncode}: {proc.stderr.read()}')
    try:
      if httpx.get(f'{url}/healthz', timeout=1).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.3)
  proc.kill()
  raise AssertionError('serve.py did not start in 120 s')


def _stop(proc):
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mlp'))
  loop.train_and_evaluate(_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def served(trained):
  """A server of the trained MLP with an API key (from the environment) and batches of at most 8 rows."""
  proc, url = _start('--config=configs/mlp.py', f'--workdir={trained}', '--config.model.hidden_sizes=(32,)',
                     '--max_batch_size=8', '--batch_timeout_ms=20', env_key=KEY)
  yield url
  _stop(proc)


def _images(n, start=0):
  test = registry.load(_config().dataset, 'test')
  return np.stack([test.preprocess(test.source[i])['image'] for i in range(start, start + n)])


def _expected(trained, images):
  _, exp, _, state, _ = evaluate._restore(_config(), trained, None)  # pylint: disable=protected-access
  return np.asarray(jax.nn.softmax(exp.task.predict(state, {'image': images}), -1))


def test_predict_in_both_formats_equals_the_model(trained, served):
  images = _images(5)
  want = _expected(trained, images)
  rows = httpx.post(f'{served}/v1/models/mlp:predict', json={'instances': images.tolist()}, headers=AUTH).json()
  assert [p['label'] for p in rows['predictions']] == np.argmax(want, -1).tolist()
  np.testing.assert_allclose([p['probabilities'] for p in rows['predictions']], want, rtol=1e-5, atol=1e-6)
  named = httpx.post(f'{served}/v1/models/mlp:predict', headers=AUTH,
                     json={'instances': [{'image': x} for x in images[:2].tolist()]}).json()
  assert named['predictions'] == rows['predictions'][:2]
  cols = httpx.post(f'{served}/v1/models/mlp:predict', json={'inputs': {'image': images.tolist()}},
                    headers=AUTH).json()
  np.testing.assert_allclose(cols['outputs']['probabilities'], want, rtol=1e-5, atol=1e-6)
  status = httpx.get(f'{served}/v1/models/mlp', headers=AUTH).json()
  assert status['model_version_status'][0]['state'] == 'AVAILABLE'
  assert status['model_version_status'][0]['version'] == '30'
  meta = httpx.get(f'{served}/v1/models/mlp/metadata', headers=AUTH).json()['metadata']['signature_def']
  image = meta['signature_def']['serving_default']['inputs']['image']
  assert image['dtype'] == 'DT_FLOAT' and [d['size'] for d in image['tensor_shape']['dim']] == ['-1', '8', '8', '1']
  assert meta['labels'] == [str(i) for i in range(10)]


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(trained, served):
  images = _images(32, start=100)
  want = np.argmax(_expected(trained, images), -1)
  before = httpx.get(f'{served}/v1/models/mlp/batching', headers=AUTH).json()['model']
  barrier = threading.Barrier(16)

  def client(i):
    with httpx.Client(timeout=60) as c:
      barrier.wait(30)
      return [c.post(f'{served}/v1/models/mlp:predict', headers=AUTH,
                     json={'instances': images[j:j + 1].tolist()}).json()['predictions'][0]['label']
              for j in (2 * i, 2 * i + 1)]

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    labels = [label for got in pool.map(client, range(16)) for label in got]
  assert labels == want.tolist()
  after = httpx.get(f'{served}/v1/models/mlp/batching', headers=AUTH).json()['model']
  rows, batches = after['rows'] - before['rows'], after['batches'] - before['batches']
  assert rows == 32 and batches < 32, (rows, batches)   # some requests shared a device batch


BAD = [
    (b'{"instances": [', 400, 'not JSON'),
    (b'[1, 2]', 400, 'must be a JSON object'),
    (b'{"instances": []}', 400, 'non-empty list'),
    (b'{"rows": [[1]]}', 400, 'exactly one of "instances"'),
    (b'{"instances": [[1, 2]]}', 400, "has shape [2], but the model takes [8, 8, 1]"),
    (b'{"instances": [[[1], [2, 3]]]}', 400, 'rectangular array'),
    (b'{"instances": ["a picture"]}', 400, 'array of numbers'),
    (b'{"instances": [{"pixels": 1}]}', 400, "['pixels'] unknown"),
    (b'{"inputs": {"image": [[1.0]]}}', 400, 'has shape [1]'),
    (b'{"instances": [[[[0.0]]]], "signature_name": "encode"}', 400, "signature_name 'encode' is not one of"),
]


@pytest.mark.parametrize('body, status, message', BAD)
def test_a_bad_request_is_a_4xx_naming_the_problem_and_the_server_goes_on(served, body, status, message):
  r = httpx.post(f'{served}/v1/models/mlp:predict', content=body, headers=AUTH)
  assert r.status_code == status and message in r.json()['error'], r.text
  assert httpx.get(f'{served}/v1/models/mlp', headers=AUTH).status_code == 200


def test_too_many_instances_unknown_model_and_path_and_the_api_key(served):
  nine = {'instances': np.zeros((9, 8, 8, 1)).tolist()}
  r = httpx.post(f'{served}/v1/models/mlp:predict', json=nine, headers=AUTH)
  assert r.status_code == 400 and '9 instances is more than this server takes at once (8)' in r.json()['error']
  r = httpx.post(f'{served}/v1/models/cnn:predict', json=nine, headers=AUTH)
  assert r.status_code == 404 and "no model 'cnn' here; this server serves 'mlp'" in r.json()['error']
  assert httpx.get(f'{served}/v2/anything', headers=AUTH).status_code == 404
  assert httpx.get(f'{served}/v1/models/mlp:predict', headers=AUTH).status_code == 405
  for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': KEY}):
    r = httpx.get(f'{served}/v1/models/mlp', headers=headers)
    assert r.status_code == 401 and 'API key' in r.json()['error']
  assert httpx.get(f'{served}/healthz').json() == {'status': 'ok'}


def test_a_generative_function_is_not_a_predict_signature():
  fn = Function('prefill', {'tokens': Input(('length',), np.int32)}, ['logits'], lambda x: x)
  model = Servable('gpt', 1, {'prefill': fn, 'decode_step': fn}, [])
  with pytest.raises(server_lib.RequestError, match='gpt is a generative model: ask POST /v1/completions'):
    server_lib.parse_predict(b'{"instances": [[1, 2]]}', model, 8)


def test_serving_an_export_and_sigterm_finishes_the_request_in_flight(trained, tmp_path):
  """The StableHLO export serves what the work directory does; a request waiting in its batch when SIGTERM
  arrives is answered, then the server exits 0 and takes no more connections."""
  out = str(tmp_path / 'hlo')
  evaluate.export(_config(), trained, out, format='stablehlo')
  proc, url = _start(f'--export={out}', '--name=digits', '--batch_timeout_ms=3000')
  try:
    images = _images(3, start=40)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=httpx.post(
        f'{url}/v1/models/digits:predict', json={'instances': images.tolist()}, timeout=60)))
    thread.start()
    time.sleep(1.0)          # the request waits up to 3 s for more rows in its batch
    proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert result['r'].status_code == 200, result['r'].text
    got = np.array([p['probabilities'] for p in result['r'].json()['predictions']])
    np.testing.assert_allclose(got, _expected(trained, images), rtol=1e-5, atol=1e-6)
    assert proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
      httpx.get(f'{url}/healthz', timeout=2)
  finally:
    _stop(proc)


# -- the OpenAI completions API, with continuous batching

GPT_FLAGS = ['--config=configs/gpt.py', '--config.model.num_layers=2', '--config.model.d_model=32',
             '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.model.max_len=32',
             '--config.dataset.seq_len=32', '--config.dataset.tokenizer=bytes', '--config.dataset.vocab_size=259']


@pytest.fixture(scope='module')
def gpt_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('gpt'))
  config = family_config('gpt', num_train_steps=60, **{'optimizer.learning_rate': 3e-3})
  loop.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def gpt_served(gpt_run):
  """The tiny GPT with 3 decode slots and an API key."""
  proc, url = _start(*GPT_FLAGS, f'--workdir={gpt_run[1]}', '--slots=3', f'--api_key={KEY}')
  yield url
  _stop(proc)


def _client(url, key=KEY):
  import openai  # pylint: disable=g-import-not-at-top
  return openai.OpenAI(base_url=f'{url}/v1', api_key=key, max_retries=0, timeout=60)


PROMPTS = ['The ', 'def f', 'import o', 'class A', 'x = ', 'It is']


def test_completions_with_the_openai_client_equal_eval_sample(gpt_run, gpt_served):
  config, workdir = gpt_run
  client = _client(gpt_served)
  before = httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()
  for prompt in PROMPTS[:2]:
    want = evaluate.sample(config, workdir, [prompt], max_new_tokens=10, temperature=0.0)[0]
    r = client.completions.create(model='gpt', prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == 1 + len(prompt.encode()) and r.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model='gpt', prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert ''.join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ('stop', 'length')
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
  after = httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()
  # One request at a time takes the first slot, and the decode steps run on it alone, not on all three slots.
  assert after['steps'] > before['steps'] and after['rows'] - before['rows'] == after['steps'] - before['steps']
  import openai  # pylint: disable=g-import-not-at-top
  with pytest.raises(openai.AuthenticationError):
    _client(gpt_served, 'wrong').completions.create(model='gpt', prompt='x', max_tokens=2)


def test_concurrent_completions_join_the_running_batch_and_each_gets_its_own(gpt_served):
  """Six greedy clients on three slots: each answer equals its prompt's alone, and decode steps were shared."""
  client = _client(gpt_served)
  alone = {p: client.completions.create(model='gpt', prompt=p, max_tokens=12, temperature=0).choices[0].text
           for p in PROMPTS}
  before = httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()
  barrier = threading.Barrier(len(PROMPTS))

  def ask(prompt):
    barrier.wait(30)
    return _client(gpt_served).completions.create(model='gpt', prompt=prompt, max_tokens=12,
                                                  temperature=0).choices[0].text

  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    together = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
  assert together == alone
  after = httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()
  assert after['active'] == 0 and after['admitted'] - before['admitted'] == len(PROMPTS)
  assert after['steps'] - before['steps'] < after['tokens'] - before['tokens']   # steps served several rows


def test_stop_strings_seeds_and_several_prompts(gpt_served):
  client = _client(gpt_served)
  full = client.completions.create(model='gpt', prompt='The ', max_tokens=12, temperature=0).choices[0].text
  stop = full[4:6]
  r = client.completions.create(model='gpt', prompt='The ', max_tokens=12, temperature=0, stop=[stop])
  assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == 'stop'
  streamed = client.completions.create(model='gpt', prompt='The ', max_tokens=12, temperature=0, stop=stop,
                                       stream=True)
  assert ''.join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
  a, b = (client.completions.create(model='gpt', prompt=['def ', 'x'], max_tokens=8, temperature=1.0, seed=3, n=2)
          for _ in range(2))
  assert [c.index for c in a.choices] == [0, 1, 2, 3] and [c.text for c in a.choices] == [c.text for c in b.choices]


BAD_COMPLETIONS = [
    ({'model': 'gpt', 'prompt': 'x' * 40}, 400, 'is 41 tokens; this model takes at most 32'),
    ({'model': 'gpt', 'prompt': 'x' * 20, 'max_tokens': 20}, 400, 'more than the 9 tokens'),
    ({'model': 'gpt3', 'prompt': 'x'}, 404, "model 'gpt3' not found"),
    ({'model': 'gpt', 'prompt': 'x', 'temperature': 3}, 400, 'temperature must be in [0, 2]'),
    ({'model': 'gpt', 'prompt': 'x', 'top_p': 0}, 400, 'top_p must be in (0, 1]'),
    ({'model': 'gpt', 'prompt': 'x', 'max_tokens': 'ten'}, 400, 'max_tokens must be an integer'),
    ({'model': 'gpt', 'prompt': [1, 2]}, 400, 'prompt must be a string'),
    ({'model': 'gpt', 'prompt': 'x', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'at most 4'),
    ({'model': 'gpt', 'prompt': 'x', 'logprobs': 2}, 400, 'logprobs=2 is not supported'),
    ({'model': 'gpt', 'prompt': 'x', 'temprature': 1}, 400, "unknown parameter 'temprature'"),
]


@pytest.mark.parametrize('body, status, message', BAD_COMPLETIONS)
def test_a_bad_completion_request_is_a_4xx_in_openais_format(gpt_served, body, status, message):
  r = httpx.post(f'{gpt_served}/v1/completions', json=body, headers=AUTH)
  assert r.status_code == status and message in r.json()['error']['message'], r.text


def test_malformed_json_predict_on_a_generator_and_a_client_that_leaves_mid_stream(gpt_served):
  r = httpx.post(f'{gpt_served}/v1/completions', content=b'{"model": ', headers=AUTH)
  assert r.status_code == 400 and 'not JSON' in r.json()['error']['message']
  r = httpx.post(f'{gpt_served}/v1/models/gpt:predict', json={'instances': [[1]]}, headers=AUTH)
  assert r.status_code == 400 and 'generative model' in r.json()['error']
  body = {'model': 'gpt', 'prompt': 'The ', 'max_tokens': 25, 'temperature': 1.0, 'stream': True}
  with httpx.stream('POST', f'{gpt_served}/v1/completions', json=body, headers=AUTH, timeout=60) as r:
    next(r.iter_lines())          # the first chunk; then the client goes away
  deadline = time.time() + 20
  while httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()['active'] and time.time() < deadline:
    time.sleep(0.1)
  assert httpx.get(f'{gpt_served}/v1/models/gpt/generation', headers=AUTH).json()['active'] == 0
  assert _client(gpt_served).completions.create(model='gpt', prompt='x', max_tokens=2).choices[0].text is not None


def test_the_decode_step_updates_its_cache_in_place(gpt_run, tmp_path):
  """What the generator calls each step, from a work directory and from a StableHLO export: `call_donating`
  gives `call`'s outputs, and its cache lands in the buffers of the cache it was given (donated: no copy of the
  whole cache a step), which are unusable afterwards."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from model_zoo.serving import generation, restore, servable as servable_lib  # pylint: disable=g-import-not-at-top
  config, workdir = gpt_run
  out = str(tmp_path / 'hlo')
  evaluate.export(config, workdir, out, format='stablehlo')
  for servable in (restore.from_workdir(config, workdir, 'gpt'), servable_lib.from_export(out, 'gpt')):
    prefill, step = servable.functions['prefill'], servable.functions['decode_step']
    first = prefill.call({'tokens': jnp.asarray([[1, 2, 3], [4, 5, 0]], jnp.int32),
                          'lengths': jnp.asarray([3, 2], jnp.int32)})
    rest = {'tokens': jnp.asarray([7, 8], jnp.int32), 'positions': first['positions']}
    want = step.run({'cache': first['cache'], **rest})
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(first['cache'])]
    got = step.call_donating({'cache': first['cache']}, rest)
    assert all(x.is_deleted() for x in jax.tree.leaves(first['cache']))
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(got['cache'])] == buffers
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), jax.device_get(got), want)
  # The export's programs generate what eval.py samples, on 1 to 3 busy rows of 3 slots.
  want = evaluate.sample(config, workdir, PROMPTS[:4], max_new_tokens=8, temperature=0.0)
  assert _generate(generation.Generator(servable, slots=3), PROMPTS[:4], 8) == want


def _generate(gen, prompts, max_tokens):
  """Greedy completions of `prompts`, all submitted at once to the generator `gen` running in this process."""
  from model_zoo.serving import generation  # pylint: disable=g-import-not-at-top
  gen.start()
  try:
    texts, done = {i: '' for i in range(len(prompts))}, threading.Semaphore(0)

    def emit(i):
      def on(event, payload):
        if event == 'text':
          texts[i] += payload
        else:
          done.release()
      return on
    for i, prompt in enumerate(prompts):
      gen.submit(generation.Request(gen.encode(prompt), max_tokens, 0.0, 1.0, (), emit(i)))
    for _ in prompts:
      assert done.acquire(timeout=60)
  finally:
    gen.stop()
  return [texts[i] for i in range(len(prompts))]


def test_the_generator_translates_as_greedy_decoding_does(tmp_path):
  """Continuous batching over the Transformer's prefill and decode_step (in this process, two slots, five
  sources) gives the translations of eval.py's greedy search (of a freshly initialized model: what is compared
  is the decoding, each source's own)."""
  from model_zoo.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  from model_zoo.serving import generation, restore  # pylint: disable=g-import-not-at-top
  del tmp_path
  config = family_config('transformer', **{'decode.beam_size': 1})
  exp = build_experiment(config, family_data(config).info)
  state = exp.init_state()
  sources = ['one', 'twenty two', 'three hundred', 'forty', 'five thousand and six']
  want = exp.task.translate(state.params, sources)
  gen = generation.Generator(restore.servable_of(exp.task, exp.task.variables(state), 'mt', 30), slots=2)
  texts = _generate(gen, sources, gen.max_tokens)
  assert texts == want
