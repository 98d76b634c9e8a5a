"""Continuous batching over a decoder's `prefill` and `decode_step` (model_zoo.tasks: a language model's, or the
translation Transformer's), for the OpenAI completions API.

A fixed number of slots share one cache on the device, a row each. Every iteration of the engine's thread:
  1. admits waiting requests into free slots: each prompt is prefilled alone (padded to the next of a few
     lengths, all compiled at start) and its cache row written into its slot; its first token is sampled;
  2. runs one `decode_step` over the slots up to the last busy one, rounded up to a power of two (a free slot
     among them computes a row nobody reads; a request takes the first free slot, so under a light load the
     step is as small as the load), feeding each slot its last token, and samples each busy slot's next token
     with its own temperature and top-p;
  3. finishes a request at its end-of-sequence token, a stop string, `max_tokens`, the cache's end, or when its
     client went away, and frees its slot for the next iteration.
So a new request joins the running batch at the next step and never waits for the others to finish; with
slots=1 requests run one at a time (the baseline of the load benchmark). Rows never see each other: each keeps
its own cache index and positions.
"""
import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.serving.batching import bucket_sizes
from model_zoo.serving.servable import Servable

CONTROL = ('tokens', 'positions', 'lengths', 'source')   # inputs that are not carried state


@dataclasses.dataclass
class Request:
  """One completion. `emit(event, payload)` is called from the engine's thread: ('text', delta) as text is
  decided, then ('done', {'finish_reason', 'prompt_tokens', 'completion_tokens', 'text': all of it}); or
  ('error', message)."""
  ids: list[int]
  max_tokens: int
  temperature: float
  top_p: float
  stop: tuple[str, ...]
  emit: object
  seed: int | None = None
  cancelled: bool = False
  generated: list = dataclasses.field(default_factory=list)
  sent: int = 0                     # characters of the text already emitted

  def cancel(self):
    self.cancelled = True


def sample(logits_V: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
  """Greedy at temperature 0; else from softmax(logits / T), cut to the smallest set of mass >= top_p."""
  if temperature == 0:
    return int(np.argmax(logits_V))
  z = logits_V.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = order[before < top_p]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    p = q / q.sum()
  return int(rng.choice(len(p), p=p))


def _held_back(text: str, stops) -> int:
  """How many trailing characters may still change: an unfinished character, or the start of a stop string."""
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:k]):
        hold = max(hold, k)
        break
  n = len(text) - hold
  while n > 0 and text[n - 1] == '\ufffd':
    n -= 1
  return len(text) - n


class Generator:
  """Continuous batching of completions over `slots` rows of one cache."""

  def __init__(self, servable: Servable, *, slots: int = 8):
    self.prefill, self.step = servable.functions['prefill'], servable.functions['decode_step']
    self.tok, self.slots = servable.tokenizer, slots
    notes = self.prefill.notes
    self.max_tokens, self.eos_id = int(notes['max_tokens']), notes.get('eos_id')
    self.translation = 'source' in self.prefill.inputs
    if self.translation:   # sources share one padded length: the state's encoded source has it
      self.source_len = int(notes['max_source_tokens'])
      self.lengths = [self.source_len]
    else:
      # Prompts are padded to a multiple of `step` (at most 16 lengths, each compiled once); the padding takes
      # cache slots, so a prompt leaves max_tokens - its padded length + 1 tokens to generate.
      step = max(8, -(-self.max_tokens // 16))
      self.lengths = sorted({min(self.max_tokens, n) for n in range(step, self.max_tokens + step, step)})
    self.state_keys = sorted({n.split('/')[0] for n in self.step.inputs} - set(CONTROL))
    # The state a decode step replaces (the cache; not the Transformer's encoded sources): updated in place, the
    # old buffers donated to the step and to the insert of a new row, as the state is never read again.
    self.carried = [k for k in self.state_keys if k in self.step.outputs]
    self.sizes = bucket_sizes(slots)     # the row counts a decode step runs on: 1, 2, 4, ..., slots
    self._first = jax.jit(lambda tree, rows: jax.tree.map(lambda x: x[:rows], tree), static_argnums=1)
    insert = lambda state, rows, slot: jax.tree.map(
        lambda s, r: jax.lax.dynamic_update_slice_in_dim(s, r.astype(s.dtype), slot, 0), state, rows)
    self._insert = jax.jit(insert, donate_argnums=0)   # `rows` written into the state from `slot` on, in place
    self._incoming: queue.Queue = queue.Queue()
    self._active: list[Request | None] = [None] * slots
    self._rngs = [None] * slots
    self._tokens = np.zeros(slots, np.int32)
    self._positions = np.zeros(slots, np.int32)
    self._filled = np.zeros(slots, np.int32)        # cache slots each row has written
    self._stop = threading.Event()
    self._thread = None
    self.steps = self.rows = self.tokens = self.admitted = 0   # rows: decoded, busy or not
    self.state = self._empty_state()

  # -- the prompts as prefill inputs

  def encode(self, prompt: str) -> list[int]:
    return self.tok.encode(prompt) if self.translation else [self.tok.bos_id] + self.tok.encode(prompt)

  def limit(self, ids: list[int]) -> tuple[int, int]:
    """(the most prompt tokens, the most new tokens a prompt of `ids` may have)."""
    if self.translation:
      return self.source_len, self.max_tokens
    width = next((n for n in self.lengths if n >= len(ids)), None)
    return self.max_tokens, 0 if width is None else self.max_tokens - width + 1

  def _used(self, ids) -> int:
    """Cache slots a prompt fills: its padded length (the Transformer's: the BOS token)."""
    return 1 if self.translation else next(n for n in self.lengths if n >= len(ids))

  def _prefill_inputs(self, rows: list[list[int]]) -> dict:
    if self.translation:
      source = np.full((len(rows), self.source_len), self.tok.pad_id, np.int32)
      for i, ids in enumerate(rows):
        source[i, :len(ids)] = ids
      return {'source': jnp.asarray(source)}
    width = next(n for n in self.lengths if n >= max(map(len, rows)))
    tokens = np.full((len(rows), width), self.tok.pad_id, np.int32)
    for i, ids in enumerate(rows):
      tokens[i, :len(ids)] = ids
    return {'tokens': jnp.asarray(tokens), 'lengths': jnp.asarray([len(ids) for ids in rows], jnp.int32)}

  def _empty_state(self) -> dict:
    out = self.prefill.call(self._prefill_inputs([[self.tok.bos_id]] * self.slots))
    return {k: out[k] for k in self.state_keys}

  def warm_up(self):
    """Compiles every prompt length's prefill, the slot insert and the decode step at each of its row counts."""
    for n in self.lengths:
      out = self.prefill.call(self._prefill_inputs([[self.tok.bos_id] * n]))
      self.state = self._insert(self.state, {k: out[k] for k in self.state_keys}, 0)
    for rows in self.sizes:
      self._decode(rows)
    self.rows = 0

  # -- the engine

  def submit(self, request: Request):
    self._incoming.put(request)

  def start(self):
    self._thread = threading.Thread(target=self._run, name='generator', daemon=True)
    self._thread.start()

  def stop(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(30)

  @property
  def active(self) -> int:
    return sum(r is not None for r in self._active)

  def _decode(self, rows: int):
    """One decode step of the first `rows` slots: -> their next tokens' logits [rows, V]. Fewer than all: the
    step runs on a copy of those rows of the state and writes them back in place."""
    carried = {k: self.state[k] for k in self.carried}
    rest = {k: v for k, v in self.state.items() if k not in self.carried}
    if rows < self.slots:
      carried, rest = self._first(carried, rows), self._first(rest, rows)
    rest.update(tokens=jnp.asarray(self._tokens[:rows]), positions=jnp.asarray(self._positions[:rows]))
    out = self.step.call_donating(carried, rest)
    new = {k: out[k] for k in self.carried}
    if rows < self.slots:
      new = self._insert({k: self.state[k] for k in self.carried}, new, 0)
    self.state.update(new)
    self.rows += rows
    return np.asarray(out['logits'])

  def _admit(self):
    while None in self._active:
      try:
        request = self._incoming.get_nowait() if self.active else self._incoming.get(timeout=0.05)
      except queue.Empty:
        return
      if request.cancelled:
        continue
      slot = self._active.index(None)
      out = self.prefill.call(self._prefill_inputs([request.ids]))
      self.state = self._insert(self.state, {k: out[k] for k in self.state_keys}, slot)
      self._active[slot], self._rngs[slot] = request, np.random.default_rng(request.seed)
      self._positions[slot] = int(np.asarray(out['positions'])[0])
      self._filled[slot] = self._used(request.ids)
      self.admitted += 1
      self._advance(slot, np.asarray(out['logits'])[0])

  def _advance(self, slot: int, logits_V: np.ndarray):
    """Samples the slot's next token and decides whether its request is done."""
    request = self._active[slot]
    token = sample(logits_V, request.temperature, request.top_p, self._rngs[slot])
    self.tokens += 1
    reason = None
    if token == self.eos_id:
      reason = 'stop'
    else:
      request.generated.append(token)
    text = self.tok.decode(request.generated)
    cut = [text.index(s) for s in request.stop if s in text]
    if cut:
      text, reason = text[:min(cut)], 'stop'
    elif reason is None and (len(request.generated) >= request.max_tokens or self._filled[slot] >= self.max_tokens):
      reason = 'length'
    end = len(text) if reason else len(text) - _held_back(text, request.stop)
    if end > request.sent:
      request.emit('text', text[request.sent:end])
      request.sent = end
    if reason:
      request.emit('done', {'finish_reason': reason, 'prompt_tokens': len(request.ids),
                            'completion_tokens': len(request.generated), 'text': text})
      self._free(slot)
    else:
      self._tokens[slot] = token

  def _free(self, slot: int):
    self._active[slot] = None
    self._tokens[slot], self._positions[slot], self._filled[slot] = self.tok.pad_id, 0, 0

  def _run(self):
    while not self._stop.is_set():
      try:
        self._admit()
        for slot, request in enumerate(self._active):
          if request is not None and request.cancelled:   # its client went away
            self._free(slot)
        if not self.active:
          continue
        last = max(slot for slot, r in enumerate(self._active) if r is not None)
        logits_SxV = self._decode(next(n for n in self.sizes if n > last))
        self.steps += 1
        live = np.array([r is not None for r in self._active], np.int32)
        self._positions += live
        self._filled += live
        for slot, request in enumerate(self._active):
          if request is not None:
            self._advance(slot, logits_SxV[slot])
      except Exception as e:  # pylint: disable=broad-except  (fail the requests in flight, keep serving)
        for slot, request in enumerate(self._active):
          if request is not None:
            request.emit('error', f'{type(e).__name__}: {e}')
            self._free(slot)
        if any(x.is_deleted() for x in jax.tree.leaves(self.state)):   # donated to the call that failed
          self.state = self._empty_state()
