"""The model protocol: what every family exposes, and all that tasks and tools may assume of a model.

A model is a `flax.linen.Module`, applied as `model.apply(variables, *inputs, train=..., **kwargs)`.
Tasks build it and choose its inputs; everything else (fine-tuning, the optimizer's layer decay,
sharding, sampling, and the compression, export and interpretation tools) reaches it only through
the names and functions below, never through its class.

Names, on the path of every parameter:
  block_<i>          the i-th repeated block counted from the input (i = 0, 1, ...), as a module
                     anywhere on the path (`encoder/block_0`, `rnn/block_1`, `block_3`): depth i + 1.
  blocks             the same blocks scanned (model.scan_layers): one module whose variables carry a
                     leading axis, entry i for block_<i> ('layers' for sharding; a cache's axis 1, after
                     the batch). `to_layout` converts any tree of variables (an optimizer state too) between
                     the two layouts; `layout` tells which one a tree's paths have.
  <name>_head        a task head, the layers that map features to the task's outputs (cls_head,
                     lm_head, mlm_head, token_head, pixel_head, ...). `init_from` starts a head afresh
                     when the checkpoint has none of its shape; `freeze='backbone'` trains heads only.
  *embed*, stem*     input layers (a top-level name): depth 0.
  <proj>_lora_a/_b   LoRA adapters; trained with the heads under `freeze='backbone'`.
  anything else      above the last block (a final LayerNorm): the top depth, with the heads.
Logical axes: every parameter is created through `nn.with_logical_partitioning`, one name per axis
  (embed, mlp, heads, kv, vocab, length, or None); model_zoo.training.sharding maps the names onto
  the device mesh, so data parallel, FSDP and tensor parallel need no code in the model.
Decoders, models that extend a sequence a step at a time (GPT, the LSTM/GRU language model, the
  translation Transformer), have a field `decode: bool`. With decode=True each call appends to a
  key/value (or recurrent-state) cache in the 'cache' collection; `init_cache` makes an empty one.
Sizes: `param_count(params)`, and `flops_per_example(model, variables, *inputs)`, the training
  FLOPs per example: three times the forward pass (which the backward pass costs twice over) of its
  matmuls and convolutions, counted in the traced program.
"""
import math
import re
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r'block_(\d+)')
STACK = 'blocks'   # the module of scanned blocks


@runtime_checkable
class Decoder(Protocol):
  """A model that can decode a step at a time: `model.clone(decode=True)` keeps a cache."""
  decode: bool

  def clone(self, **updates) -> 'Decoder':
    ...


def path_names(key_path) -> tuple[str, ...]:
  """A jax key path (or a tuple of names) as names: ('block_0', 'mlp', 'wi', 'kernel')."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in key_path)


def block_index(path: tuple[str, ...]) -> int | None:
  """i for a parameter inside a module named block_<i>; None outside every block."""
  for part in reversed(path):
    if m := _BLOCK.fullmatch(part):
      return int(m.group(1))
  return None


def stacked_depths(path: tuple[str, ...], leaf_shape: tuple) -> np.ndarray | None:
  """For a variable of scanned blocks (a `blocks` module on its path): the depth of each entry of its leading
  axis, 1 .. L; None for any other variable."""
  return np.arange(1, leaf_shape[0] + 1) if STACK in path else None


def is_head(path: tuple[str, ...]) -> bool:
  return any(part.endswith('_head') for part in path)


def is_lora(path: tuple[str, ...]) -> bool:
  return any('_lora_' in part for part in path)


def is_input_layer(path: tuple[str, ...]) -> bool:
  return bool(path) and ('embed' in path[0] or path[0].startswith('stem'))


def depth(path: tuple[str, ...], num_blocks: int) -> int:
  """0 for input layers, i + 1 inside block_<i>, num_blocks + 1 for heads and what is above the blocks."""
  if is_head(path):
    return num_blocks + 1
  i = block_index(path)
  if i is not None:
    return i + 1
  return 0 if is_input_layer(path) else num_blocks + 1


def layout(paths) -> str | None:
  """'scanned' where a `blocks` module is on some path, 'unrolled' where a block_<i> is, else None."""
  paths = list(paths)
  if any(STACK in p for p in paths):
    return 'scanned'
  return 'unrolled' if any(block_index(p) is not None for p in paths) else None


def to_layout(tree, target: str | None, take=lambda x, i: x[i], join=jnp.stack):
  """Any pytree of variables (params, an optimizer state that mirrors them, shapes) with its blocks laid out as
  `target` says: 'unrolled' splits every `blocks` module into block_0, block_1, ... (take(leaf, i)), 'scanned'
  joins the block_<i> of a module into `blocks` (join([leaf_0, leaf_1, ...])); None leaves it as it is."""
  if target is None:
    return tree
  return _map_dicts(lambda d: _unstack(d, take) if target == 'unrolled' else _stack(d, join), tree)


def _map_dicts(f, tree):
  """f applied to every dict of a pytree (of dicts, named tuples, dataclasses), the innermost first."""
  if isinstance(tree, dict):
    return f({k: _map_dicts(f, v) for k, v in tree.items()})
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if treedef.num_leaves == 1 and children and children[0] is tree:   # a leaf
    return tree
  return jax.tree_util.tree_unflatten(treedef, [_map_dicts(f, c) for c in children])


def _leaf(x) -> bool:
  return not isinstance(x, dict)


def _unstack(d: dict, take) -> dict:
  if STACK not in d:
    return d
  d = dict(d)
  stacked = d.pop(STACK)
  length = jax.tree.leaves(stacked, is_leaf=_leaf)[0].shape[0]
  d.update({f'block_{i}': jax.tree.map(lambda x, i=i: take(x, i), stacked, is_leaf=_leaf) for i in range(length)})
  return d


def _stack(d: dict, join) -> dict:
  numbered = sorted((k for k in d if _BLOCK.fullmatch(str(k))), key=lambda k: int(k[len('block_'):]))
  if not numbered:
    return d
  parts = [d[k] for k in numbered]
  d = {k: v for k, v in d.items() if k not in numbered}
  d[STACK] = jax.tree.map(lambda *xs: join(list(xs)), *parts, is_leaf=_leaf)
  return d


def param_count(params) -> int:
  """Number of scalars in a parameter tree (boxed or not)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params))))


def init_cache(model: Decoder, *inputs, **kwargs):
  """An empty cache for `model.clone(decode=True)`, sized by `inputs` (those of one call that covers
  the whole sequence to be decoded: a [B, max_len] token array for GPT)."""
  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), *inputs, train=False, **kwargs))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def empty_cache(like, batch_size):
  """Zeros shaped as the cache `like` (init_cache's, or its jax.eval_shape) at `batch_size` rows: every cache
  array is batch-major. Made from shapes alone, it does not trace the model at a symbolic batch (an export's)."""
  return jax.tree.map(lambda s: jnp.zeros((batch_size, *s.shape[1:]), s.dtype), like)


def flops_per_example(model: nn.Module, variables, *inputs, **kwargs) -> float:
  """Training FLOPs per example: 3 x 2 x the multiply-adds of the forward pass's matmuls and convolutions.

  Counted in the traced program (`jax.make_jaxpr`), so it is exact for any family: a Transformer gets
  6 N + 12 L d T per token (N its matmul parameters; Kaplan et al., 2020), a convolution the work of
  every output position. Element-wise work (activations, norms, softmax) is not counted, as in MFU.
  Models with the shared attention are counted with every logit of T x S computed ('dense', as PaLM's MFU counts
  them; a causal mask makes half of them unneeded, which model_zoo's kernels skip in blocks, and which MaxText's
  convention leaves out): a fused kernel's FLOPs are hidden in one call.
  `variables` and `inputs` may be arrays or `jax.ShapeDtypeStruct`s.
  """
  if isinstance(getattr(model, 'attention_impl', None), str):
    model = model.clone(attention_impl='dense')
  jaxpr = jax.make_jaxpr(lambda v, *x: model.apply(v, *x, train=False, **kwargs))(nn.unbox(variables), *inputs)
  return 3.0 * _forward_flops(jaxpr.jaxpr) / inputs[0].shape[0]


def _forward_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if not eqn.outvars:   # its results unused (dropped from a scan's body): nothing computed
      continue
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs, numbers = eqn.invars[1].aval.shape, eqn.params['dimension_numbers']
      kernel_positions = math.prod(rhs[d] for d in numbers.rhs_spec[2:])
      # A transposed convolution dilates its input: only 1 in prod(lhs_dilation) positions is real.
      total += (2.0 * math.prod(out) * kernel_positions * rhs[numbers.rhs_spec[1]]
                / math.prod(eqn.params['lhs_dilation']))
    subs = [s for v in eqn.params.values() for s in (v if isinstance(v, (tuple, list)) else [v])
            if isinstance(s, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
    counts = [_forward_flops(getattr(s, 'jaxpr', s)) for s in subs]
    if name == 'cond':   # one branch runs
      total += max(counts, default=0.0)
    else:
      total += eqn.params.get('length', 1) * sum(counts) if name == 'scan' else sum(counts)
  return total


def logical_axes(params) -> dict[tuple[str, ...], Any]:
  """{path: logical axis names} of a boxed parameter tree; a leaf without names maps to None."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {path_names(k): (v.names if isinstance(v, nn.LogicallyPartitioned) else None) for k, v in flat}
