"""Test set-up: fake CPU devices, a shared compilation cache, and strict rank promotion. All of it must
happen before jax is imported.

The tests' programs are tiny and compiled once each: XLA's CPU backend is told to spend less time
optimising them (FAST_COMPILE), which cuts the suite's time by about a quarter, and to emit fusions
through its older loop emitters, which compile about a fifth faster than the newer MLIR fusion emitters
(five tiny families trained two steps from a cold cache: 31.4 s -> 25.1 s on 2 CPU cores); the CLI runs
of the tests get the same flags (helpers.xla_flags).

Devices: the files of SHARDED run their in-process tests sharded over 8 fake devices; the others on one,
where XLA has no partitioning to do: the same five families compile and train in 15.5 s on one device
against 24.0 s on eight (two or four cost as much as eight). Under pytest-xdist (`-n auto`) even-numbered
workers have 8 devices and run the SHARDED files, odd-numbered ones have one and run the rest but
SUBPROCESSES, which either kind takes once it has finished its own (Scheduler below): each file with
in-process tests always runs on the same kind; with one worker, or without xdist (`-n 0`), the one
process has 8 devices and runs everything. A file whose tests shard in-process (a mesh of several devices,
a batch split 8 ways) belongs in SHARDED; so do the tools' files whose every test should run sharded.
(The CLI runs of the tests choose their own devices: helpers.run_cli.)"""
import os
import sys
import tempfile

FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                '--xla_cpu_use_fusion_emitters=false')
SHARDED = {'test_activation_sharding.py', 'test_autoencoder_vae.py', 'test_bad_input.py', 'test_cross_mesh.py', 'test_lm.py', 'test_mixer.py',
           'test_protocol.py', 'test_recovery.py', 'test_resnet_vit.py', 'test_train.py'}
# Files whose time goes to command-line runs in subprocesses (which choose their own devices): run by either
# kind of worker, once it has none of its own kind left, longest first.
SUBPROCESSES = ('test_multihost_sharded.py', 'test_cli.py', 'test_kill.py', 'test_sweep.py', 'test_object_store.py',
                'test_multihost.py')


def devices_of_worker(worker: str) -> int:
  """Fake devices of pytest-xdist worker 'gw<i>' ('' outside xdist): 8 for even i, 1 for odd."""
  return 1 if worker and int(worker[2:]) % 2 else 8


DEVICES = devices_of_worker(os.environ.get('PYTEST_XDIST_WORKER', ''))
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' {FAST_COMPILE} --xla_force_host_platform_device_count={DEVICES}').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'model_zoo_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ['JAX_NUMPY_RANK_PROMOTION'] = 'raise'
os.environ.setdefault('MODEL_ZOO_PEAK_PROBE_SIZES', '256')   # MFU's CPU matmul probe: small (a second saved a process)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_runtest_setup(item):
  if DEVICES == 1 and os.path.basename(str(item.path)) in SHARDED:
    import pytest  # pylint: disable=g-import-not-at-top
    pytest.fail(f'{item.path.name} is in conftest.SHARDED but ran in a process of one device')


def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's --dist loadfile (whole files to each worker as it runs short), except that SHARDED files go
  to the workers of 8 devices and the others to the workers of one (to any worker where there is one kind)."""
  if config.getvalue('dist') != 'loadfile':
    return None
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=g-import-not-at-top

  class Scheduler(LoadFileScheduling):

    def _assign_work_unit(self, node):
      one_kind = len({devices_of_worker(n.workerinput['workerid']) for n in self.nodes}) == 1
      sharded = devices_of_worker(node.workerinput['workerid']) > 1
      name = os.path.basename
      own = [s for s in self.workqueue if one_kind or (
          name(s) not in SUBPROCESSES and (name(s) in SHARDED) == sharded)]
      either = sorted((s for s in self.workqueue if name(s) in SUBPROCESSES), key=lambda s: SUBPROCESSES.index(name(s)))
      scopes = own + either
      if not scopes:   # what is left is for the other kind of worker: this one finishes what it has and stops
        node.shutdown()
        return
      work_unit = self.workqueue.pop(scopes[0])
      self.assigned_work.setdefault(node, {})[scopes[0]] = work_unit
      collection = self.registered_collections[node]
      node.send_runtest_some([collection.index(n) for n, done in work_unit.items() if not done])

  return Scheduler(config, log)
