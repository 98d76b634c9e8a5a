"""serve.py's HTTP server (FastAPI on uvicorn): TensorFlow Serving's REST API, so its clients work unchanged.

  GET  /healthz                          {"status": "ok"}; the only endpoint open without the API key
  GET  /v1/models/<name>                 the version status TF Serving reports (the version is the step)
  GET  /v1/models/<name>/metadata        the signature: each function's inputs and outputs, dtypes and shapes
  GET  /v1/models/<name>/batching        per function, the device batches run and the rows they held
  POST /v1/models/<name>:predict         {"instances": [...]} (rows) or {"inputs": ...} (columns), optionally
                                         "signature_name" ('serving_default' is the model's first function) ->
                                         {"predictions": [...]} or {"outputs": ...}

  POST /v1/completions                   the OpenAI completions API, for language models and translation:
                                         model, prompt (a string or a list), max_tokens, temperature, top_p,
                                         n, stop, seed, stream (server-sent events); continuous batching
                                         (model_zoo.serving.generation)
  GET  /v1/models/<name>/generation      the generator's slots, active requests, steps and tokens

An instance is the input's value (a function with one input) or an object of named inputs. Concurrent
requests are batched (model_zoo.serving.batching). Every mistake in a request is a 4xx with {"error": "..."}
naming it, and never stops the server: malformed JSON, a missing or unknown input, a wrong shape or dtype, more
instances than --max_batch_size, an unknown model or signature. With an API key, every endpoint but /healthz
needs `Authorization: Bearer <key>` (401 otherwise).
"""
import asyncio
import contextlib
import hmac
import json
import signal
import time
import uuid

import numpy as np

from model_zoo.serving import batching, generation
from model_zoo.serving.servable import Servable

DEFAULT_SIGNATURE = 'serving_default'
_TF_DTYPES = {'float32': 'DT_FLOAT', 'float16': 'DT_HALF', 'bfloat16': 'DT_BFLOAT16', 'float64': 'DT_DOUBLE',
              'int32': 'DT_INT32', 'int64': 'DT_INT64', 'int8': 'DT_INT8', 'uint8': 'DT_UINT8', 'bool': 'DT_BOOL'}


class RequestError(Exception):
  """A bad request: its HTTP status and the message returned as {"error": message}."""

  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.param = status, param


class CompletionError(RequestError):
  """A bad completions request, answered in OpenAI's error format."""


_IGNORED = {'user': None, 'logprobs': (None,), 'echo': (False, None), 'best_of': (None, 1), 'suffix': (None, ''),
            'presence_penalty': (0, 0.0, None), 'frequency_penalty': (0, 0.0, None), 'logit_bias': (None,),
            'stream_options': None}


def _number(body, key, default, lo, hi, kind=float, lo_open=False):
  value = body.get(key, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
    raise CompletionError(400, f'{key} must be {"a number" if kind is float else "an integer"}, got {value!r}', key)
  if value < lo or (lo_open and value == lo) or value > hi:
    raise CompletionError(400, f'{key} must be in {"(" if lo_open else "["}{lo}, {hi}], got {value}', key)
  return kind(value)


def _json_object(body: bytes, error, what: str) -> dict:
  """The request body as a JSON object, else `error` (a 400) saying it must be `what`."""
  try:
    request = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise error(400, f'the request body is not JSON: {e}') from e
  if not isinstance(request, dict):
    raise error(400, f'the request body must be {what}')
  return request


def parse_completion(body: bytes, name: str) -> dict:
  """The OpenAI completions request's fields, checked: a CompletionError names the first mistake."""
  request = _json_object(body, CompletionError, 'a JSON object')
  known = {'model', 'prompt', 'max_tokens', 'temperature', 'top_p', 'n', 'stop', 'stream', 'seed'}
  for key, value in request.items():
    if key in _IGNORED:
      if _IGNORED[key] is not None and value not in _IGNORED[key]:
        raise CompletionError(400, f'{key}={value!r} is not supported by this server', key)
    elif key not in known:
      raise CompletionError(400, f'unknown parameter {key!r}', key)
  if request.get('model') != name:
    raise CompletionError(404, f'model {request.get("model")!r} not found; this server serves {name!r}', 'model')
  prompt = request.get('prompt')
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
    raise CompletionError(400, 'prompt must be a string or a non-empty list of strings', 'prompt')
  stop = request.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
    raise CompletionError(400, 'stop must be a string or a list of at most 4 non-empty strings', 'stop')
  stream = request.get('stream', False)
  if not isinstance(stream, bool):
    raise CompletionError(400, f'stream must be true or false, got {stream!r}', 'stream')
  seed = request.get('seed')
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise CompletionError(400, f'seed must be an integer, got {seed!r}', 'seed')
  return {'prompts': prompts, 'max_tokens': _number(request, 'max_tokens', 16, 1, 1 << 20, int),
          'temperature': _number(request, 'temperature', 1.0, 0, 2), 'n': _number(request, 'n', 1, 1, 16, int),
          'top_p': _number(request, 'top_p', 1.0, 0, 1, lo_open=True), 'stop': tuple(stop), 'stream': stream,
          'seed': seed}


def _array(value, spec, what: str, batched: bool) -> np.ndarray:
  """`value` (nested lists) as an array of `spec`'s dtype and shape (with a leading batch axis if `batched`)."""
  try:
    array = np.asarray(value)
  except (ValueError, TypeError) as e:
    raise RequestError(400, f'{what} is not a rectangular array of numbers ({e})') from e
  if array.dtype == object or array.dtype.kind not in 'biuf':
    raise RequestError(400, f'{what} must be a rectangular array of numbers, not {type(value).__name__} '
                            f'of {array.dtype}')
  dtype = np.dtype(spec.dtype)
  if dtype.kind in 'iu' and array.dtype.kind not in 'iu':
    raise RequestError(400, f'{what} must hold integers ({dtype}), got {array.dtype} values')
  shape = tuple(spec.shape)
  got = array.shape[1:] if batched else array.shape
  if got != shape:
    raise RequestError(400, f'{what} has shape {list(got)}, but the model takes {list(shape)}'
                            f'{" per instance" if batched else ""}')
  return array.astype(dtype)


def parse_predict(body: bytes, servable: Servable, max_rows: int) -> tuple[str, dict, int, bool]:
  """-> (function name, inputs {name: [n, ...]}, n, whether the request was in the row format)."""
  request = _json_object(body, RequestError, 'a JSON object with "instances" or "inputs"')
  signature = request.get('signature_name', DEFAULT_SIGNATURE)
  name = servable.default if signature == DEFAULT_SIGNATURE else signature
  if name not in servable.functions:
    raise RequestError(400, f'signature_name {signature!r} is not one of this model\'s: '
                            f'{", ".join([DEFAULT_SIGNATURE] + list(servable.functions))}')
  fn = servable.functions[name]
  if servable.generative:
    raise RequestError(400, f'{servable.name} is a generative model: ask POST /v1/completions for text')
  unknown = sorted(set(request) - {'instances', 'inputs', 'signature_name'})
  if unknown or ('instances' in request) == ('inputs' in request):
    raise RequestError(400, 'the request needs exactly one of "instances" (a list of rows) or "inputs" '
                            f'(columns){f", and no {unknown}" if unknown else ""}')
  names = list(fn.inputs)
  if 'instances' in request:
    instances = request['instances']
    if not isinstance(instances, list) or not instances:
      raise RequestError(400, '"instances" must be a non-empty list')
    rows = len(instances)
    if rows > max_rows:
      raise RequestError(400, f'{rows} instances is more than this server takes at once ({max_rows}); send fewer')
    columns = {k: [] for k in names}
    for i, instance in enumerate(instances):
      if isinstance(instance, dict):
        missing, extra = sorted(set(names) - set(instance)), sorted(set(instance) - set(names))
        if missing or extra:
          raise RequestError(400, f'instance {i} must have the inputs {names}'
                                  f'{f"; {missing} missing" if missing else ""}{f"; {extra} unknown" if extra else ""}')
      elif len(names) == 1:
        instance = {names[0]: instance}
      else:
        raise RequestError(400, f'instance {i} must be an object with the inputs {names}')
      for k in names:
        columns[k].append(_array(instance[k], fn.inputs[k], f'instance {i}\'s {k!r}', batched=False))
    return name, {k: np.stack(v) for k, v in columns.items()}, rows, True
  inputs = request['inputs']
  if not (isinstance(inputs, dict) and set(inputs) == set(names)):
    if len(names) != 1 or isinstance(inputs, dict):
      raise RequestError(400, f'"inputs" must be an object with the inputs {names}')
    inputs = {names[0]: inputs}
  arrays = {k: _array(inputs[k], fn.inputs[k], f'input {k!r}', batched=True) for k in names}
  counts = {a.shape[0] for a in arrays.values()}
  if len(counts) != 1:
    raise RequestError(400, f'the inputs have different numbers of rows: {sorted(counts)}')
  rows = counts.pop()
  if not 0 < rows <= max_rows:
    raise RequestError(400, f'{rows} rows; this server takes 1 to {max_rows} at once')
  return name, arrays, rows, False


def predict_response(outputs: dict, rows: int, row_format: bool) -> dict:
  """TF Serving's response: a value per instance (one output) or an object of outputs per instance."""
  names = sorted(outputs)
  if row_format:
    if len(names) == 1:
      return {'predictions': np.asarray(outputs[names[0]]).tolist()}
    return {'predictions': [{k: np.asarray(outputs[k][i]).tolist() for k in names} for i in range(rows)]}
  if len(names) == 1:
    return {'outputs': np.asarray(outputs[names[0]]).tolist()}
  return {'outputs': {k: np.asarray(v).tolist() for k, v in outputs.items()}}


def _tensor_info(name, shape, dtype) -> dict:
  return {'dtype': _TF_DTYPES.get(str(np.dtype(dtype)), str(dtype)), 'name': name,
          'tensor_shape': {'dim': [{'size': str(d if isinstance(d, int) else -1), 'name': ''}
                                   for d in ['batch', *shape]]}}


def metadata(servable: Servable) -> dict:
  defs = {}
  for name, fn in servable.functions.items():
    key = DEFAULT_SIGNATURE if name == servable.default else name
    defs[key] = {'inputs': {k: _tensor_info(k, i.shape, i.dtype) for k, i in fn.inputs.items()},
                 'outputs': {k: {'name': k} for k in fn.outputs}, 'method_name': 'tensorflow/serving/predict'}
  return {'model_spec': {'name': servable.name, 'signature_name': '', 'version': str(servable.version)},
          'metadata': {'signature_def': {'signature_def': defs, 'labels': servable.labels}}}


def build_app(servable: Servable, *, api_key: str = '', max_batch_size: int = 32, batch_timeout_ms: float = 5.0,
              batching_enabled: bool = True, slots: int = 8, warm_up: bool = True):
  """The FastAPI application serving `servable`."""
  from fastapi import FastAPI, Request  # pylint: disable=g-import-not-at-top
  from fastapi.responses import JSONResponse, StreamingResponse  # pylint: disable=g-import-not-at-top
  from starlette.exceptions import HTTPException as StarletteHTTPException  # pylint: disable=g-import-not-at-top

  batchers = {name: batching.Batcher(fn, max_batch_size=max_batch_size, timeout_s=batch_timeout_ms / 1000,
                                     enabled=batching_enabled)
              for name, fn in servable.functions.items() if not servable.generative}
  generator = None
  if servable.generative and servable.tokenizer is not None:
    generator = generation.Generator(servable, slots=slots)
  if warm_up:
    for batcher in batchers.values():
      batcher.warm_up()
    if generator is not None:
      generator.warm_up()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    for batcher in batchers.values():
      batcher.start()
    if generator is not None:
      generator.start()
    yield
    for batcher in batchers.values():
      await batcher.stop()
    if generator is not None:
      generator.stop()

  app = FastAPI(title=f'model_zoo: {servable.name}', lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.batchers = batchers

  def error(status: int, message: str):
    return JSONResponse({'error': message}, status_code=status)

  @app.exception_handler(RequestError)
  async def request_error(request, e):
    del request
    if isinstance(e, CompletionError):   # the shape the openai package reads
      return JSONResponse({'error': {'message': str(e), 'type': 'invalid_request_error', 'param': e.param,
                                     'code': None}}, status_code=e.status)
    return error(e.status, str(e))

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, e):   # an unknown path or method, in TF Serving's error format
    return error(e.status_code, f'{request.method} {request.url.path}: {e.detail}')

  @app.middleware('http')
  async def guard(request: Request, call_next):
    if api_key and request.url.path != '/healthz':
      given = request.headers.get('authorization', '')
      if not hmac.compare_digest(given.encode(), f'Bearer {api_key}'.encode()):
        return error(401, 'this server needs an API key: send the header "Authorization: Bearer <key>"')
    try:
      return await call_next(request)
    except Exception as e:  # pylint: disable=broad-except  (the server outlives any one request)
      return error(500, f'{type(e).__name__}: {e}')

  def check_model(model: str):
    if ':' in model:   # GET /v1/models/<name>:predict
      raise RequestError(405, f'/v1/models/{model} takes POST with a JSON body')
    if model != servable.name:
      raise RequestError(404, f'no model {model!r} here; this server serves {servable.name!r}')

  @app.get('/healthz')
  async def healthz():
    return {'status': 'ok'}

  @app.get('/v1/models/{model}')
  async def status(model: str):
    check_model(model)
    return {'model_version_status': [{'version': str(servable.version), 'state': 'AVAILABLE',
                                      'status': {'error_code': 'OK', 'error_message': ''}}]}

  @app.get('/v1/models/{model}/metadata')
  async def model_metadata(model: str):
    check_model(model)
    return metadata(servable)

  @app.get('/v1/models/{model}/batching')
  async def batching_counts(model: str):
    """How many device batches ran, with how many rows: the batching the load figures report."""
    check_model(model)
    return {name: {'batches': b.batches, 'rows': b.rows} for name, b in batchers.items()}

  @app.get('/v1/models/{model}/generation')
  async def generation_counts(model: str):
    check_model(model)
    if generator is None:
      raise RequestError(404, f'{servable.name} does not generate text')
    return {'slots': generator.slots, 'active': generator.active, 'admitted': generator.admitted,
            'steps': generator.steps, 'rows': generator.rows, 'tokens': generator.tokens}

  @app.post('/v1/completions')
  async def completions(request: Request):
    if generator is None:
      raise CompletionError(400, f'{servable.name} does not generate text; ask POST /v1/models/{servable.name}'
                                 f':predict')
    params = parse_completion(await request.body(), servable.name)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    subs = []
    for index, prompt in enumerate(p for p in params['prompts'] for _ in range(params['n'])):
      ids = generator.encode(prompt)
      most_prompt, most_new = generator.limit(ids)
      if len(ids) > most_prompt:
        raise CompletionError(400, f'prompt {index} is {len(ids)} tokens; this model takes at most {most_prompt}',
                              'prompt')
      if params['max_tokens'] > most_new:
        raise CompletionError(400, f'max_tokens={params["max_tokens"]} is more than the {most_new} tokens the '
                                   f'model\'s context ({generator.max_tokens}) leaves after prompt {index}',
                              'max_tokens')
      def emit(event, payload, index=index):   # from the generator's thread; unstreamed, only the end wakes the loop
        if params['stream'] or event != 'text':
          loop.call_soon_threadsafe(events.put_nowait, (index, event, payload))
      seed = None if params['seed'] is None else params['seed'] + index
      subs.append(generation.Request(ids, params['max_tokens'], params['temperature'], params['top_p'],
                                     params['stop'], emit, seed=seed))
    for sub in subs:
      generator.submit(sub)
    head = {'id': f'cmpl-{uuid.uuid4().hex[:24]}', 'object': 'text_completion', 'created': int(time.time()),
            'model': servable.name}

    async def results():
      """(index, event, payload) until every choice is done; a client that goes away frees its slots."""
      done = 0
      try:
        while done < len(subs):
          item = await events.get()
          done += item[1] in ('done', 'error')
          yield item
      finally:
        for sub in subs:
          sub.cancel()

    if params['stream']:
      async def sse():
        async for index, event, payload in results():
          if event == 'error':
            yield f'data: {json.dumps({"error": {"message": payload, "type": "server_error"}})}\n\n'
            return
          choice = {'text': payload if event == 'text' else '', 'index': index, 'logprobs': None,
                    'finish_reason': payload['finish_reason'] if event == 'done' else None}
          yield f'data: {json.dumps({**head, "choices": [choice]})}\n\n'
        yield 'data: [DONE]\n\n'
      return StreamingResponse(sse(), media_type='text/event-stream')

    texts, reasons, usage = [''] * len(subs), [None] * len(subs), [0, 0]
    async for index, event, payload in results():
      if event == 'error':
        raise RequestError(500, payload)
      texts[index], reasons[index] = payload['text'], payload['finish_reason']   # 'done': only ends come
      usage[0] += payload['prompt_tokens']
      usage[1] += payload['completion_tokens']
    return {**head, 'choices': [{'text': t, 'index': i, 'logprobs': None, 'finish_reason': r}
                                for i, (t, r) in enumerate(zip(texts, reasons))],
            'usage': {'prompt_tokens': usage[0], 'completion_tokens': usage[1], 'total_tokens': sum(usage)}}

  @app.post('/v1/models/{model}:predict')
  async def predict(model: str, request: Request):
    check_model(model)
    name, inputs, rows, row_format = parse_predict(await request.body(), servable, max_batch_size)
    outputs = await batchers[name].submit(inputs, rows)
    return predict_response(outputs, rows, row_format)

  return app


def serve(app, host: str, port: int):
  """Runs `app` until SIGINT or SIGTERM: then it stops accepting, finishes the requests in flight and returns."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  # uvicorn shuts down gracefully on the signal, then restores these handlers and raises it again: with them a
  # drained server exits 0 rather than dying of the signal.
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: None)
  uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning', access_log=False)).run()
