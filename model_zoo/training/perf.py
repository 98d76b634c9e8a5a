"""Peak FLOP/s of the device, for model FLOP utilisation (MFU).

GPUs: the vendor's dense peak for the compute dtype. CPUs have no such number: the peak is
measured as the best of a few large matmuls, once per process and dtype.
"""
import functools
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s by device kind substring: {dtype: flops}.
GPU_PEAKS = {
    'H200': {'bfloat16': 989e12, 'float32': 67e12},
    'H100': {'bfloat16': 989e12, 'float32': 67e12},   # SXM; PCIe is lower (756e12 bf16)
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
    'L4': {'bfloat16': 121e12, 'float32': 30e12},
    'A10': {'bfloat16': 125e12, 'float32': 31e12},
    'V100': {'bfloat16': 125e12, 'float32': 15.7e12},  # fp16 tensor cores
}


@functools.cache
def measured_matmul_peak(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def device_peak(dtype: str = 'float32') -> float:
  """Peak FLOP/s of one device: the table for known GPUs, else measured."""
  device = jax.devices()[0]
  if device.platform == 'gpu':
    for name, peaks in GPU_PEAKS.items():
      if name in device.device_kind:
        return peaks.get(dtype, peaks['float32'])
  return measured_matmul_peak(dtype)
