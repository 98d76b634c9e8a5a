"""Request batching for :predict, as TF Serving's batching does it: the rows of concurrent requests are grouped
into one device batch of at most `max_batch_size` rows, waiting at most `timeout_s` after the first for more,
and padded to the next of a few fixed sizes (powers of two), so nothing compiles again after `warm_up`.

One batch runs at a time, on one worker thread, so the event loop keeps taking requests meanwhile. With
`enabled=False` every request runs alone (padded the same way): the baseline the load benchmark compares with.
"""
import asyncio
import concurrent.futures
import dataclasses

import numpy as np

from model_zoo.serving.servable import Function


def bucket_sizes(max_batch_size: int) -> list[int]:
  """1, 2, 4, ... up to and including max_batch_size."""
  sizes = [1]
  while sizes[-1] < max_batch_size:
    sizes.append(min(2 * sizes[-1], max_batch_size))
  return sizes


@dataclasses.dataclass
class _Request:
  inputs: dict          # name -> [n, ...]
  rows: int
  future: asyncio.Future


class Batcher:
  """Runs `fn` on batches of the requests given to `submit`."""

  def __init__(self, fn: Function, *, max_batch_size: int = 32, timeout_s: float = 0.005, enabled: bool = True):
    self.fn, self.max_batch_size, self.timeout_s, self.enabled = fn, max_batch_size, timeout_s, enabled
    self.sizes = bucket_sizes(max_batch_size)
    self._queue: asyncio.Queue | None = None
    self._carried: _Request | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f'batch-{fn.name}')
    self._task = None
    self.batches = 0       # device batches run, and the real rows in them (for the load figures)
    self.rows = 0

  def warm_up(self):
    """Compiles every padded size once."""
    for size in self.sizes:
      self.fn.run({k: np.zeros((size, *i.shape), i.dtype) for k, i in self.fn.inputs.items()})

  def start(self):
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def stop(self):
    if self._task is not None:
      self._task.cancel()
    self._executor.shutdown(wait=True)

  async def submit(self, inputs: dict, rows: int) -> dict:
    """The outputs of `fn` on `inputs` (`rows` rows, at most max_batch_size)."""
    future = asyncio.get_running_loop().create_future()
    await self._queue.put(_Request(inputs, rows, future))
    return await future

  async def _next(self, timeout: float | None) -> _Request | None:
    if self._carried is not None:
      request, self._carried = self._carried, None
      return request
    if timeout is None:
      return await self._queue.get()
    try:
      return await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
    except asyncio.TimeoutError:
      return None

  async def _loop(self):
    loop = asyncio.get_running_loop()
    while True:
      first = await self._next(None)
      group, rows = [first], first.rows
      deadline = loop.time() + self.timeout_s
      while self.enabled and rows < self.max_batch_size:
        request = await self._next(deadline - loop.time())
        if request is None:
          break
        if rows + request.rows > self.max_batch_size:
          self._carried = request   # the first of the next batch
          break
        group.append(request)
        rows += request.rows
      group = [r for r in group if not r.future.done()]   # a client that went away while it waited
      if not group:
        continue
      rows = sum(r.rows for r in group)
      size = next(s for s in self.sizes if s >= rows)
      batch = {k: np.concatenate([r.inputs[k] for r in group]
                                 + [np.zeros((size - rows, *i.shape), i.dtype)]) for k, i in self.fn.inputs.items()}
      try:
        outputs = await loop.run_in_executor(self._executor, self.fn.run, batch)
      except Exception as e:  # pylint: disable=broad-except  (each waiting request gets the error)
        for r in group:
          if not r.future.done():
            r.future.set_exception(e)
        continue
      self.batches += 1
      self.rows += rows
      start = 0
      for r in group:
        if not r.future.done():
          r.future.set_result({k: np.asarray(v)[start:start + r.rows] for k, v in outputs.items()})
        start += r.rows
