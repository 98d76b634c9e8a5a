"""The import graph of model_zoo/: no cycle between modules, and each layer imports only those below it.

Every import counts, deferred ones inside functions included: a cycle that only a deferred import
closes is still a cycle. The graph is read from the source (ast), so nothing is executed.
"""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'model_zoo')

# What each part of model_zoo may import from model_zoo (besides itself). The drivers
# (experiment, training.loop, evaluation.evaluate, cli) sit on top and may import anything.
ALLOWED = {
    # Local paths and gs:// alike (etils.epath), under everything that reads or writes a file.
    'model_zoo.paths': {'model_zoo.errors'},
    'model_zoo.models': {'model_zoo.errors', 'model_zoo.config'},
    'model_zoo.data': {'model_zoo.errors', 'model_zoo.config', 'model_zoo.paths'},
    'model_zoo.workdir': {'model_zoo.data.base', 'model_zoo.errors', 'model_zoo.paths'},
    'model_zoo.inference': {'model_zoo.models'},
    'model_zoo.evaluation.plots': {'model_zoo.paths'},
    # Interpretation reaches models only through the task interface it is handed (and the protocol's names).
    'model_zoo.interpret': {'model_zoo.errors', 'model_zoo.data.base', 'model_zoo.models.protocol',
                            'model_zoo.evaluation.plots', 'model_zoo.workdir', 'model_zoo.paths'},
    'model_zoo.compression.settings': {'model_zoo.errors'},
    'model_zoo.compression.quantization': {'model_zoo.errors', 'model_zoo.compression.settings'},
    'model_zoo.compression.pruning': {'model_zoo.errors', 'model_zoo.config', 'model_zoo.models.protocol'},
}
# compression.ptq restores, quantizes and saves a trained run for eval.py, serving.restore one for serve.py:
# drivers too; data.prepare is the entry point of `python -m model_zoo.data.prepare`.
DRIVERS = {'model_zoo.experiment', 'model_zoo.training.loop', 'model_zoo.evaluation.evaluate', 'model_zoo.cli',
           'model_zoo.compression.ptq', 'model_zoo.compression.distill', 'model_zoo.serving.restore',
           'model_zoo.data.prepare'}


def modules() -> dict[str, str]:
  """{dotted module name: file} of every module of model_zoo."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(root, f)
  return out


def imports(path: str, known: set[str]) -> set[str]:
  """The model_zoo modules that the file at `path` imports, anywhere in it."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').startswith('model_zoo'):
      for a in node.names:
        full = f'{node.module}.{a.name}'
        out.add(full if full in known else node.module)
  return out


def graph() -> dict[str, set[str]]:
  found = modules()
  return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """A cycle [a, b, ..., a] in the directed graph, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'x': {'y'}, 'y': {'y'}}) == ['y', 'y']


def test_model_zoo_has_no_import_cycle():
  edges = graph()
  assert len(edges) > 40 and 'model_zoo.models.protocol' in edges
  assert find_cycle(edges) is None, ' -> '.join(find_cycle(edges))


def test_package_inits_import_nothing():
  """Importing model_zoo.models.x runs model_zoo/models/__init__.py first: it must not import back."""
  edges = graph()
  for name, path in modules().items():
    if path.endswith('__init__.py'):
      assert not edges[name], (name, edges[name])


def test_each_layer_imports_only_what_lies_below_it():
  edges = graph()
  for name, targets in edges.items():
    if name in DRIVERS:
      continue
    assert not targets & DRIVERS, f'{name} imports a driver: {targets & DRIVERS}'
    for layer, allowed in ALLOWED.items():
      if name == layer or name.startswith(layer + '.'):
        bad = {t for t in targets if not (t == layer or t.startswith(layer + '.'))
               and not any(t == a or t.startswith(a + '.') for a in allowed)}
        assert not bad, f'{name} imports {sorted(bad)}, above its layer {layer}'
  # Tasks reach models only through the registry and the protocol, never a family's module.
  families = {n for n in edges if n.startswith('model_zoo.models.')} - {
      'model_zoo.models.registry', 'model_zoo.models.protocol', 'model_zoo.models.layers'}
  for name, targets in edges.items():
    if name.startswith(('model_zoo.tasks', 'model_zoo.inference', 'model_zoo.transfer', 'model_zoo.training')):
      assert not targets & families, (name, targets & families)
