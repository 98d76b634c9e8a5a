"""Peak FLOP/s of the machine, for model FLOP utilisation (MFU).

GPUs: the vendor's dense peak for the compute dtype, times the number of devices. CPUs have no
such number, and fake CPU devices share the same cores: the peak is measured as the best of a
few large matmuls, once per process and dtype: n = 2048 and 4096, or the sizes listed in the
environment variable MODEL_ZOO_PEAK_PROBE_SIZES (the tests set 256, where MFU is not what is tested).
"""
import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s of one device, by device-kind substring and dtype.
GPU_PEAKS = {
    'H200': {'bfloat16': 989e12, 'float32': 67e12},
    'H100': {'bfloat16': 989e12, 'float32': 67e12},   # SXM; the PCIe card is lower (756e12 bf16)
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
    'L4': {'bfloat16': 121e12, 'float32': 30e12},
    'A10': {'bfloat16': 125e12, 'float32': 31e12},
}


# XLA's GPU options for training speed, as MaxText's GPU recipes set them, checked against the installed XLA
# (tests/test_cli.py: XLA refuses to start on a flag it does not know). Two of MaxText's are gone from XLA 0.10:
# --xla_gpu_graph_level=0, now --xla_gpu_enable_command_buffer=, and --xla_gpu_enable_triton_softmax_fusion.
# Applied by train.py's and eval.py's --gpu_flags, and by benchmarks/gpt_throughput.py --gpu_flags.
GPU_XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',    # schedule collectives to overlap with compute
    '--xla_gpu_enable_highest_priority_async_stream=true',
    '--xla_gpu_enable_pipelined_all_gather=true',        # FSDP: the next layer's weights gathered during this one
    '--xla_gpu_enable_pipelined_reduce_scatter=true',    #   and the gradients reduced while the next is computed
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',  # scanned layers: overlap across iterations
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',   # fewer, larger collectives
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864',
    '--xla_gpu_enable_all_gather_combine_by_dim=false',
    '--xla_gpu_enable_reduce_scatter_combine_by_dim=false',
    '--xla_gpu_enable_triton_gemm=false',                # cuBLAS for the matmuls
    '--xla_gpu_enable_command_buffer=',                  # no CUDA graphs
    '--xla_disable_hlo_passes=rematerialization',        # what is recomputed is model.remat_policy's choice
)


def use_gpu_xla_flags():
  """Adds GPU_XLA_FLAGS to the environment's XLA_FLAGS (a flag already there keeps its value). XLA reads them
  when JAX starts its backends, so this must come first; a CPU run ignores them."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError('use_gpu_xla_flags() comes before anything that starts JAX (jax.devices(), a computation)')
  own = os.environ.get('XLA_FLAGS', '').split()
  names = {flag.split('=')[0] for flag in own}
  os.environ['XLA_FLAGS'] = ' '.join(own + [f for f in GPU_XLA_FLAGS if f.split('=')[0] not in names])


def _probe_sizes() -> tuple[int, ...]:
  return tuple(int(n) for n in os.environ.get('MODEL_ZOO_PEAK_PROBE_SIZES', '2048,4096').split(','))


@functools.cache
def measured_matmul_peak(dtype: str = 'float32', sizes: tuple[int, ...] | None = None, repeats: int = 3) -> float:
  """Best FLOP/s of n x n x n matmuls on the default device (the best over sizes and repeats)."""
  best = 0.0
  sizes = sizes or _probe_sizes()
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      f(a, a).block_until_ready()
      best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
  return best


def peak_flops(dtype: str = 'float32') -> float:
  """Peak FLOP/s of all devices together: the table for known GPUs, else measured."""
  device = jax.devices()[0]
  if device.platform == 'gpu':
    for name, peaks in GPU_PEAKS.items():
      if name in device.device_kind:
        return peaks.get(dtype, peaks['float32']) * jax.device_count()
  if device.platform == 'cpu':
    # Fake CPU devices share the cores that the measured matmul already used; hosts add up.
    return measured_matmul_peak(dtype) * jax.process_count()
  return measured_matmul_peak(dtype) * jax.device_count()


_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
          'pred': 1, 's8': 1, 'u8': 1}


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{kind: (count, bytes)} of the all-gathers, all-reduces, reduce-scatters and all-to-alls of a compiled
  (optimized, per-device) HLO module, by the size of their results; one in a while loop's body counts once per
  trip (its known trip count)."""
  trips = {body: int(n) for body, n in re.findall(r'body=%?([\w.\-]+)[^\n]*?"known_trip_count":\{"n":"(\d+)"', hlo)}
  out = {}
  computation = ''
  for line in hlo.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      computation = head.group(1)
      continue
    m = re.match(r'^\s+(?:ROOT )?%?[\w.\-]+ = (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(',
                 line)
    if m:
      times = trips.get(computation, 1)
      size = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
                 for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)))
      count, total = out.get(m.group(2), (0, 0))
      out[m.group(2)] = (count + times, total + times * size)
  return out
