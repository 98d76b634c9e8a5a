"""`eval.py --mode=interpret`: why a trained model predicts what it does, and how faithful that account is.

What each task offers (`Task.interpretations`, the first being the default --method):
  classifiers (images, BERT)  integrated_gradients | smoothgrad | gradient_x_input | occlusion
                              (model_zoo.interpret.attributions), and attention for a model with attention
  translation, language models, masked LM, token labels
                              attention: every layer's and head's attention; the Transformer's
                              cross-attention as a source x target alignment of its own translation
  GPT                         also the four attributions, of the next token after a row's first document
                              (a class among the vocabulary) to that document's tokens
  autoencoder, VAE            latents: a 2-D PCA of the test latents by class, and traversals

For a classifier, each run measures all four methods on the first `interpret.num_examples` examples of
the eval split, whatever --method draws (interpret.json):
  deletion_auc/<method>, deletion_auc/random   area under the deletion curve of the target's probability
  ig_completeness_error (and _max)             |sum IG - (f(x) - f(x'))| / |f(x) - f(x')|, the mean (max)
  randomized_weights_rank_correlation          Spearman correlation between the trained model's IG and that
                                               of the same model at fresh random weights (Adebayo et al.,
                                               2018: a faithful method gives a low one)
  masked_top<k>_accuracy/<method>, masked_random<k>_accuracy   (text) accuracy with the k most attributed
                                               tokens (k random tokens) set to the baseline
These are also merged into eval.json. The pictures go to <workdir>/interpret/, written whole (a staging directory, then a rename) only once
everything has been computed.
"""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from model_zoo import paths
from model_zoo.data.base import Dataset
from model_zoo.errors import UserError
from model_zoo.interpret import attributions as attr_lib
from model_zoo.interpret import pictures
from model_zoo.models import protocol
from model_zoo.workdir import Workdir

SCORES = ('logit', 'log_probability')
MAX_TOKENS_DRAWN = 64   # attention pictures: the first tokens of a row (each gets a labelled row and column)
# The figures also merged into eval.json (interpret.json holds everything).
FAITHFULNESS = ('deletion_auc/', 'ig_completeness_error', 'randomized_weights_rank_correlation', 'masked_')


def check(config, task_cls, method: str | None):
  """A UserError, before anything is read, for a --method the task has not or options out of range."""
  offers = getattr(task_cls, 'interpretations', ())
  if not offers:
    raise UserError(f'--mode=interpret has nothing for the {config.task} task yet')
  if method and method not in offers:
    raise UserError(f'--method={method} does not apply to the {config.task} task; it offers: {", ".join(offers)}')
  o = config.interpret
  for key, ok in (('num_examples', o.num_examples >= 1), ('steps', o.steps >= 1),
                  ('smoothgrad_samples', o.smoothgrad_samples >= 1), ('occlusion_window', o.occlusion_window >= 1),
                  ('deletion_points', o.deletion_points >= 1), ('top_k', o.top_k >= 1), ('chunk', o.chunk >= 1),
                  ('examples_shown', o.examples_shown >= 1)):
    if not isinstance(o[key], int) or not ok:
      raise UserError(f'config.interpret.{key} must be an integer >= 1, got {o[key]!r}')
  if not o.smoothgrad_noise >= 0:
    raise UserError(f'config.interpret.smoothgrad_noise must be >= 0, got {o.smoothgrad_noise!r}')
  if o.score not in SCORES:
    raise UserError(f'config.interpret.score must be one of {", ".join(SCORES)}, got {o.score!r}')
  baselines = getattr(task_cls, 'attribution_baselines', ())
  if o.baseline and baselines and o.baseline not in baselines:
    raise UserError(f'config.interpret.baseline={o.baseline!r} is not one of the {config.task} task\'s: '
                    f'{", ".join(baselines)}')
  if o.target not in ('label', 'predicted') and not o.target.lstrip('-').isdigit():
    raise UserError(f"config.interpret.target must be 'label', 'predicted' or a class index, got {o.target!r}")


def _target_class(config, num_classes: int) -> int | None:
  """The fixed class of config.interpret.target, or None for 'label' / 'predicted'."""
  t = config.interpret.target
  if t in ('label', 'predicted'):
    return None
  if not 0 <= int(t) < num_classes:
    raise UserError(f'config.interpret.target={t} is not a class of this model: use 0..{num_classes - 1}, '
                    f"'label' or 'predicted'")
  return int(t)


def run(exp, state, data: Dataset, workdir: Workdir, method: str | None, texts: list[str], *,
        step: int | None = None, sanity_check: bool = True) -> dict:
  """Computes what `method` (default: the task's first) shows and the faithfulness figures, then writes
  <workdir>/interpret.json and <workdir>/interpret/. Returns the figures. `sanity_check=False` leaves out the
  model at random weights (a quantized model, whose task cannot initialise one)."""
  task, config = exp.task, exp.config
  method = method or task.interpretations[0]
  _read_eval(workdir)   # a damaged eval.json is an error now, not after the work
  variables = nn.unbox(task.variables(state))
  files = {}     # name -> a function that writes it to a path
  if method in attr_lib.METHODS:
    figures = _classifier(exp, variables, data, method, texts, files, sanity_check)
  elif method == 'attention':
    figures = _attention(exp, variables, data, texts, files)
  else:
    figures = _latents(task, variables, data, config.interpret, files)
  figures = {'step': step, 'method': method, **figures}
  if jax.process_index() == 0:
    _write(workdir, figures, files)
  return figures


def _write(workdir: Workdir, figures: dict, files: dict):
  """Every picture into a staging directory that then replaces <workdir>/interpret/; interpret.json, then the
  faithfulness figures into eval.json (beside eval.py's metrics)."""
  faithfulness = {k: v for k, v in figures.items() if k.startswith(FAITHFULNESS)}
  previous = _read_eval(workdir)
  with paths.staged_directory(workdir.interpretations, replace=True) as staging:
    for name, write in files.items():
      write(os.path.join(staging, name))
  _write_json(workdir.interpret, {**figures, 'files': sorted(files)})
  if faithfulness:
    _write_json(workdir.eval, {**previous, **faithfulness, 'interpret_step': figures['step']})


def _read_eval(workdir: Workdir) -> dict:
  """eval.json's metrics ({} if there is none); a damaged one is a UserError (it is not overwritten)."""
  if not workdir.eval.exists():
    return {}
  try:
    previous = json.loads(workdir.eval.read_text())
    if not isinstance(previous, dict):
      raise ValueError('not a JSON object')
    return previous
  except (OSError, ValueError) as e:
    raise UserError(f'{workdir.eval} cannot be read ({type(e).__name__}: {e}): move it aside (or run --mode=eval, '
                    f'which writes it anew), then interpret again') from e


def _write_json(path, content: dict):
  paths.write_atomically(path, json.dumps(content, indent=2).encode())


def _examples(data: Dataset, n: int) -> dict:
  examples = [data.preprocess(data.source[i]) for i in range(min(n, len(data.source)))]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def _batches(arrays: dict, size: int):
  """Batches of `size` rows (the last padded with copies of row 0), and the real rows of each."""
  n = len(next(iter(arrays.values())))
  for lo in range(0, n, size):
    real = min(size, n - lo)
    batch = {k: v[lo:lo + size] for k, v in arrays.items()}
    if real < size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], size - real, 0)]) for k, v in batch.items()}
    yield batch, real


def _measure(task, opts, fixed_target, variables, random_variables, batch, key):
  """Everything a classifier's interpretation measures on one batch (jitted)."""
  att = task.attribution(variables, batch, opts.baseline or task.attribution_baselines[0])
  logits_BxC = att.logits(att.x)
  labels_B = att.labels
  predicted_B = jnp.argmax(logits_BxC, -1)
  if fixed_target is not None:
    target_B = jnp.full_like(labels_B, fixed_target)
  elif opts.target == 'label':
    target_B = jnp.where(labels_B >= 0, labels_B, predicted_B)
  else:
    target_B = predicted_B

  def pick(logits_fn, transform):
    return lambda x: jnp.take_along_axis(transform(logits_fn(x)), target_B[:, None], 1)[:, 0]
  as_score = (lambda z: z) if opts.score == 'logit' else functools.partial(jax.nn.log_softmax, axis=-1)
  score = pick(att.logits, as_score)
  probability = pick(att.logits, functools.partial(jax.nn.softmax, axis=-1))
  kw = dict(steps=opts.steps, samples=opts.smoothgrad_samples, noise=opts.smoothgrad_noise,
            window=opts.occlusion_window, chunk=opts.chunk)
  out = {'probabilities': jax.nn.softmax(logits_BxC, -1), 'target': target_B, 'label': labels_B,
         'score': score(att.x), 'baseline_score': score(att.baseline), 'valid': att.valid}
  k_random, k_smooth = jax.random.split(key)
  orders = {m: attr_lib.attribute(m, score, att.x, att.baseline, att.valid, key=k_smooth, **kw)
            for m in attr_lib.METHODS}
  out.update({f'attribution/{m}': a for m, a in orders.items()})
  orders['random'] = jax.random.uniform(k_random, att.valid.shape)
  n_B = jnp.sum(att.valid.reshape(att.valid.shape[0], -1), 1)
  orders_O = jnp.stack(list(orders.values()))    # every order through one traced model (vmap)
  curves_O = jax.vmap(lambda a: attr_lib.deletion_curve(probability, att.x, att.baseline, a, att.valid,
                                                        points=opts.deletion_points, chunk=opts.chunk))(orders_O)
  out.update({f'curve/{m}': c for m, c in zip(orders, curves_O)})
  if att.valid.ndim == 2:   # tokens: accuracy with the top k set to the baseline

    def masked_correct(a):
      x_k = attr_lib.delete(att.x, att.baseline, attr_lib.deletion_order(a, att.valid), jnp.minimum(opts.top_k, n_B))
      return jnp.argmax(att.logits(x_k), -1) == labels_B
    out.update({f'masked_correct/{m}': c for m, c in zip(orders, jax.vmap(masked_correct)(orders_O))})
  if random_variables is not None:
    r = task.attribution(random_variables, batch, opts.baseline or task.attribution_baselines[0])
    out['attribution/random_weights'] = attr_lib.attribute(
        'integrated_gradients', pick(r.logits, as_score), r.x, r.baseline, r.valid, key=k_smooth, **kw)
  return out


def _classifier(exp, variables, data, method, texts, files, sanity_check) -> dict:
  task, config = exp.task, exp.config
  opts = config.interpret
  fixed = _target_class(config, _num_classes(task))
  random_variables = None
  if sanity_check:   # the same model at fresh random weights (another seed than training's)
    random_state = jax.jit(lambda r: nn.unbox(task.init_state(r, exp.example)))(jax.random.key(config.seed + 1))
    random_variables = task.variables(random_state)
  measure = jax.jit(functools.partial(_measure, task, opts, fixed))
  key = jax.random.key(config.seed)
  size = min(config.batch_size, opts.num_examples)
  parts = []
  for i, (batch, real) in enumerate(_batches(_examples(data, opts.num_examples), size)):
    out = measure(variables, random_variables, batch, jax.random.fold_in(key, i))
    parts.append({k: np.asarray(v)[:real] for k, v in out.items()})
  got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  n = len(got['label'])
  names = list(attr_lib.METHODS) + ['random']
  curves = {m: got[f'curve/{m}'].mean(0) for m in names}
  areas = {m: float(attr_lib.area(got[f'curve/{m}']).mean()) for m in names}
  ig = got['attribution/integrated_gradients']
  error = np.asarray(attr_lib.completeness_error(ig, got['score'], got['baseline_score']))
  figures = {'num_examples': n, 'target': opts.target, 'score': opts.score,
             'baseline': opts.baseline or task.attribution_baselines[0], 'steps': opts.steps,
             'accuracy': float(np.mean(got['probabilities'].argmax(-1) == got['label'])),
             **{f'deletion_auc/{m}': areas[m] for m in names},
             'ig_completeness_error': float(error.mean()), 'ig_completeness_error_max': float(error.max())}
  if sanity_check:
    figures['randomized_weights_rank_correlation'] = _rank_correlation(ig, got['attribution/random_weights'],
                                                                       got['valid'])
  k = opts.top_k
  if f'masked_correct/{method}' in got:
    figures.update({f'masked_top{k}_accuracy/{m}': float(got[f'masked_correct/{m}'].mean())
                    for m in attr_lib.METHODS})
    figures[f'masked_random{k}_accuracy'] = float(got['masked_correct/random'].mean())
  title = f'{method} of the {opts.target} class ({opts.score}) on {config.dataset.name}:{config.dataset.eval_split}'
  files['deletion_curve.png'] = lambda p: pictures.deletion_curves(
      curves, areas, p, f'deletion on {n} examples of {config.dataset.name}:{config.dataset.eval_split}')
  if texts:   # the given texts are drawn; the figures stay those of the eval split
    shown_got = {}
    for i, (batch, real) in enumerate(_batches(task.text_batch(texts), size)):   # the shapes measured above
      out = measure(variables, random_variables, batch, jax.random.fold_in(key, i))
      for k, v in out.items():
        shown_got.setdefault(k, []).append(np.asarray(v)[:real])
    shown_got = {k: np.concatenate(v) for k, v in shown_got.items()}
    shown = task.text_batch(texts)
    rows = range(len(texts))
  else:
    shown, shown_got = _examples(data, opts.num_examples), got
    correct = shown_got['probabilities'].argmax(-1) == shown_got['label']
    s = opts.examples_shown
    rows = list(np.flatnonzero(correct)[:s]) + list(np.flatnonzero(~correct)[:s])
  a = shown_got[f'attribution/{method}']
  names_of = _class_names(task)
  if a.ndim == 3:   # images
    items = [{'image': shown['image'][i], 'attribution': a[i], 'probabilities': shown_got['probabilities'][i],
              'label': int(shown_got['label'][i]),
              'group': 'correct' if shown_got['probabilities'][i].argmax() == shown_got['label'][i] else 'wrong'}
             for i in rows]
    files['attributions.png'] = lambda p: pictures.image_attributions(items, names_of, p, title)
  else:
    tok = task.info.tokenizer
    items = []
    for i in rows:
      segments = shown['segment_ids'][i]
      keep = np.flatnonzero((segments != 0) & (segments == segments[0]))   # the first document of a packed row
      p_C = shown_got['probabilities'][i]
      items.append({'tokens': _pieces(tok, shown['inputs'][i][keep], spaces=True),
                    'attribution': a[i][keep], 'predicted': names_of[int(p_C.argmax())],
                    'probability': float(p_C.max()),
                    'label': names_of[int(shown_got['label'][i])] if shown_got['label'][i] >= 0 else '?'})
    files['attributions.html'] = lambda p: pictures.text_attributions(items, p, title)
  if 'attention' in task.interpretations and _has_attention(task, variables, shown):
    _attention_pictures(task, variables, {k: v[:opts.examples_shown] for k, v in shown.items()}, files)
  return figures


def _num_classes(task) -> int:
  """A classifier's classes; a language model's, its vocabulary (the next token is the class)."""
  return task.info.num_classes or task.info.tokenizer.vocab_size


def _class_names(task) -> tuple[str, ...]:
  if task.info.class_names:
    return tuple(task.info.class_names)
  if not task.info.num_classes and task.info.tokenizer is not None:   # tokens as classes
    return tuple(repr(task.info.tokenizer.decode([i])) for i in range(task.info.tokenizer.vocab_size))
  return tuple(str(c) for c in range(_num_classes(task)))


def _rank_correlation(a_BxU, b_BxU, valid_BxU) -> float:
  """The mean over examples of the Spearman correlation of two attributions over the valid units."""
  rs = []
  for a, b, v in zip(a_BxU.reshape(len(a_BxU), -1), b_BxU.reshape(len(b_BxU), -1), valid_BxU.reshape(len(a_BxU), -1)):
    r = scipy.stats.spearmanr(a[v], b[v]).statistic
    rs.append(0.0 if np.isnan(r) else r)
  return float(np.mean(rs))


def _has_attention(task, variables, batch) -> bool:
  try:
    jax.eval_shape(task.attention, variables, batch)
    return True
  except UserError:
    return False


def _ordered(maps: dict) -> list[tuple[str, np.ndarray]]:
  """The attention maps in the order of their blocks (then names)."""
  return sorted(((k, np.asarray(v)) for k, v in maps.items()),
                key=lambda kv: (kv[0].split('/')[0], protocol.block_index(tuple(kv[0].split('/'))) or 0, kv[0]))


def _pieces(tok, ids, *, spaces: bool = False) -> list[str]:
  """The text each token adds (decoding one more token at a time, so word boundaries show whatever the
  tokenizer); its leading space kept with `spaces`, else stripped; '·' for a token that adds none ([CLS])."""
  ids = [int(t) for t in ids]
  texts = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
  pieces = [b[len(a):] if b.startswith(a) else tok.decode([t]) for a, b, t in zip(texts, texts[1:], ids)]
  return [(p if spaces else p.strip()) or '·' for p in pieces]


def _attention_pictures(task, variables, batch, files):
  """attention.png (every layer and head of the first example; tokens on the axes for text) and, for
  images, rollout.png (Abnar & Zuidema, 2020)."""
  maps = _ordered(jax.jit(task.attention)(variables, batch))
  if 'image' in batch:
    panels = [(f'{name} head {h}', m[0, h]) for name, m in maps for h in range(m.shape[1])]
    files['attention.png'] = lambda p: pictures.matrices(panels, p, columns=maps[0][1].shape[1],
                                                         title='attention of the first image (patch x patch)')
    images = batch['image']
    rolled = [_rollout_map(np.stack([m[i] for _, m in maps])) for i in range(len(images))]
    files['rollout.png'] = lambda p: pictures.rollout(list(images), rolled, p, 'attention rollout')
    return
  tok = task.info.tokenizer
  keep = np.flatnonzero(batch['segment_ids'][0] != 0)[:MAX_TOKENS_DRAWN]
  labels = _pieces(tok, batch['inputs'][0][keep])
  panels = [(f'{name} head {h}', m[0, h][np.ix_(keep, keep)]) for name, m in maps for h in range(m.shape[1])]
  files['attention.png'] = lambda p: pictures.matrices(panels, p, rows_labels=labels, column_labels=labels,
                                                       columns=maps[0][1].shape[1],
                                                       title='attention (query rows, key columns)')


def rollout(probabilities_LxNxPxP) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020): R = prod_l (0.5 mean_heads(A_l) + 0.5 I), rows renormalised,
  from the first layer up: R[i, j] is how much output token i draws on input patch j through every layer."""
  p = probabilities_LxNxPxP.shape[-1]
  r = np.eye(p)
  for a in probabilities_LxNxPxP:
    a = 0.5 * a.mean(0) + 0.5 * np.eye(p)
    r = (a / a.sum(-1, keepdims=True)) @ r
  return r


def _rollout_map(probabilities_LxNxPxP) -> np.ndarray:
  """The rollout of the class token (or, without one, the mean over the patches) as a square patch grid."""
  r = rollout(probabilities_LxNxPxP)
  p = r.shape[0]
  has_class_token = int(round(p ** 0.5)) ** 2 != p    # P = grid^2 + 1
  row = r[0, 1:] if has_class_token else r.mean(0)
  grid = int(round(len(row) ** 0.5))
  return row.reshape(grid, grid)


def _attention(exp, variables, data, texts, files) -> dict:
  task, opts = exp.task, exp.config.interpret
  if hasattr(task, 'translate'):
    return _alignment(task, variables, data, texts, files)
  if texts:
    batch = task.text_batch(texts)
  else:
    batch = _examples(data, opts.examples_shown)
  if not _has_attention(task, variables, batch):
    task.attention(variables, batch)   # raises the task's error
  _attention_pictures(task, variables, batch, files)
  return {'num_examples': int(len(next(iter(batch.values()))))}


def _alignment(task, variables, data, texts, files) -> dict:
  """Translates each text, then reads the decoder's cross-attention while it reads its own translation
  (teacher forcing): alignment[-<i>].png, target tokens (rows) x source tokens (columns), per layer
  averaged over heads, and over all layers."""
  sources = texts or [s for s, _ in list(data.raw)[:2]]
  outputs = task.translate(variables['params'], sources)
  batch = task.text_batch(sources, outputs)
  maps = _ordered({k: v for k, v in jax.jit(task.attention)(variables, batch).items() if 'cross_attention' in k})
  tok = task.info.tokenizer
  figures = {'translations': []}
  for i, (source, output) in enumerate(zip(sources, outputs)):
    s_keep = np.flatnonzero(batch['src_segments'][i])
    t_keep = np.flatnonzero(batch['tgt_segments'][i])
    columns, rows = _pieces(tok, batch['src'][i][s_keep]), _pieces(tok, batch['tgt_out'][i][t_keep])
    panels = [(name.replace('/cross_attention', ''), m[i].mean(0)[np.ix_(t_keep, s_keep)]) for name, m in maps]
    panels.append(('all layers', np.mean([m for _, m in panels], 0)))
    files[f'alignment{f"-{i}" if i else ""}.png'] = functools.partial(
        pictures.matrices, panels, rows_labels=rows, column_labels=columns, columns=len(panels),
        title=f'{source!r} -> {output!r}: cross-attention (mean over heads)')
    figures['translations'].append({'source': source, 'translation': output})
  return figures


def _latents(task, variables, data, opts, files) -> dict:
  """The test latents (the VAE's means) projected on their first two principal components, coloured by
  class; traversals along the first principal directions; and how well the latents keep the classes apart
  (the leave-one-out accuracy of 5 nearest neighbours in the latent space)."""
  arrays = _examples(data, opts.num_examples)
  params = variables['params']
  z_NxZ = np.asarray(jax.jit(task.encode)(params, arrays['image']), np.float64)
  mean_Z = z_NxZ.mean(0)
  _, s, vt = np.linalg.svd(z_NxZ - mean_Z, full_matrices=False)
  variance = s ** 2 / max(len(z_NxZ) - 1, 1)
  xy_Nx2 = (z_NxZ - mean_Z) @ vt[:2].T
  figures = {'num_examples': len(z_NxZ), 'pca_explained_variance_ratio': (variance / variance.sum())[:2].tolist()}
  labels = arrays.get('label')
  if labels is not None:
    d = ((z_NxZ[:, None] - z_NxZ[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, 1)[:, :5]
    votes = np.array([np.bincount(labels[row], minlength=labels.max() + 1).argmax() for row in near])
    figures['latent_knn_accuracy'] = float(np.mean(votes == labels))
    names = task.info.class_names or tuple(str(c) for c in range(int(labels.max()) + 1))
    files['latents_pca.png'] = lambda p: pictures.scatter(xy_Nx2, labels, names, p, 'test latents, PCA')
  directions = min(8, vt.shape[0])
  t_T = np.linspace(-3, 3, 9)
  z_grid = mean_Z + (t_T[None, :, None] * np.sqrt(variance[:directions])[:, None, None]) * vt[:directions, None]
  images = np.asarray(jax.jit(task.decode)(params, jnp.asarray(z_grid.reshape(-1, z_NxZ.shape[1]), jnp.float32)))
  from model_zoo.evaluation import plots  # pylint: disable=g-import-not-at-top
  files['latent_traversal.png'] = lambda p: plots.image_grid(
      images, p, columns=len(t_T), row_labels=[f'PC {i + 1}' for i in range(directions)],
      title='decoded: mean latent + t sd along each principal direction, t = -3..3')
  return figures
