"""Test set-up: 8 fake CPU devices (so every in-process test runs sharded), a shared
compilation cache, and strict rank promotion. All of it must happen before jax is imported.

The tests' programs are tiny and compiled once each: XLA's CPU backend is told to spend less time
optimising them (FAST_COMPILE), which cuts the suite's time by about a quarter, and to emit fusions
through its older loop emitters, which compile about a fifth faster than the newer MLIR fusion emitters
(five tiny families trained two steps from a cold cache: 31.4 s -> 25.1 s on 2 CPU cores); the CLI runs
of the tests get the same flags (helpers.xla_flags)."""
import os
import sys
import tempfile

FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {FAST_COMPILE} --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'model_zoo_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ['JAX_NUMPY_RANK_PROMOTION'] = 'raise'
os.environ.setdefault('MODEL_ZOO_PEAK_PROBE_SIZES', '256')   # MFU's CPU matmul probe: small (a second saved a process)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
