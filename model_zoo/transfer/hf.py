"""Hugging Face BERT and GPT-2 checkpoints (a local directory) <-> our BERT and GPT.

`model_config(dir)` turns config.json into the fields of our `config.model` (plus `vocab_size`);
`load_params(dir, name)` reads the weights (model.safetensors, sharded or not, else
pytorch_model.bin) into our parameter tree as float32 numpy arrays (the checkpoint's tokenizer is
model_zoo.data.tokenizers.HFTokenizer); `save(dir, params, model_config)` writes our parameters back as a checkpoint
that `transformers` loads. Names, with Hugging Face's without its 'bert.' / 'transformer.' prefix:

  BERT                                                 ours
  embeddings.word_embeddings                           embed/embedding
  embeddings.position_embeddings                       pos_embedding
  embeddings.token_type_embeddings                     type_embedding
  embeddings.LayerNorm                                 embed_norm
  encoder.layer.i.attention.self.{query,key,value}     block_i/self_attention/{query,key,value}
  encoder.layer.i.attention.output.dense               block_i/self_attention/out
  encoder.layer.i.attention.output.LayerNorm           block_i/self_attention_norm
  encoder.layer.i.intermediate.dense                   block_i/mlp/wi
  encoder.layer.i.output.dense                         block_i/mlp/wo
  encoder.layer.i.output.LayerNorm                     block_i/mlp_norm
  cls.predictions.transform.dense                      mlm_head/transform
  cls.predictions.transform.LayerNorm                  mlm_head/transform_norm
  cls.predictions.bias                                 mlm_head/bias
  pooler.dense                                         cls_head/pooler

  GPT-2
  wte, wpe                                             embed/embedding, pos_embedding
  h.i.ln_1, h.i.ln_2                                   block_i/self_attention_norm, block_i/mlp_norm
  h.i.attn.c_attn (q, k, v packed on the output axis)  block_i/self_attention/{query,key,value}
  h.i.attn.c_proj                                      block_i/self_attention/out
  h.i.mlp.c_fc, h.i.mlp.c_proj                         block_i/mlp/wi, block_i/mlp/wo
  ln_f                                                 final_norm

A LayerNorm's weight/bias (gamma/beta in old checkpoints) are our scale/bias. torch's nn.Linear
stores [out, in], the transpose of our kernels; GPT-2's Conv1D stores [in, out] as we do. Our
attention kernels split the model axis into heads: [D, N, H] for q/k/v, [N, H, D] for out. Both
models tie the output layer to the word embedding, so lm_head / cls.predictions.decoder weights are
not read; buffers (attn.bias, position_ids) and other heads (classifier, next sentence) are ignored.
Head entries (mlm_head, cls_head/pooler) are returned only when the checkpoint has them.
"""
import json
import math
import os

from flax import traverse_util
import flax.linen as nn
import numpy as np

from model_zoo.errors import UserError

SUPPORTED = "Hugging Face BERT (model_type 'bert') and GPT-2 (model_type 'gpt2') checkpoints"
_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'relu': 'relu'}
_HF_ACTIVATIONS = {'gelu_exact': 'gelu', 'gelu': 'gelu_new', 'relu': 'relu'}
_PREFIX = {'bert': 'bert.', 'gpt': 'transformer.'}
_QKV = ('query', 'key', 'value')


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise UserError(f'{path} not found: expected a Hugging Face checkpoint directory ({SUPPORTED})') from e
  except (OSError, ValueError) as e:
    raise UserError(f'could not read {path}: {e}') from e


def model_config(directory: str) -> dict:
  """Our `config.model` fields ('name' 'bert' or 'gpt', ...) and 'vocab_size', from config.json."""
  path = os.path.join(directory, 'config.json')
  hf = _read_json(path)
  kind = hf.get('model_type') if isinstance(hf, dict) else None

  def activation(name):
    if name not in _ACTIVATIONS:
      raise UserError(f'{path}: activation {name!r} is not supported; supported: {", ".join(_ACTIVATIONS)}')
    return _ACTIVATIONS[name]

  try:
    c = None
    if kind == 'bert':
      if hf.get('position_embedding_type', 'absolute') != 'absolute':
        raise UserError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                        f"only 'absolute'")
      c = dict(name='bert', num_layers=hf['num_hidden_layers'], d_model=hf['hidden_size'],
             num_heads=hf['num_attention_heads'], d_ff=hf['intermediate_size'],
             max_len=hf['max_position_embeddings'], type_vocab_size=hf.get('type_vocab_size', 2),
             activation=activation(hf.get('hidden_act', 'gelu')), ln_epsilon=hf.get('layer_norm_eps', 1e-12),
             vocab_size=hf['vocab_size'])
    if kind == 'gpt2':
      if not hf.get('scale_attn_weights', True) or hf.get('scale_attn_by_inverse_layer_idx', False):
        raise UserError(f'{path}: only the standard 1/sqrt(head_dim) attention scaling is supported '
                        f'(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)')
      c = dict(name='gpt', num_layers=hf['n_layer'], d_model=hf['n_embd'], num_heads=hf['n_head'],
             d_ff=hf.get('n_inner') or 4 * hf['n_embd'], max_len=hf['n_positions'], positional='learned',
             pre_ln=True, tie_embeddings=True, attention_bias=True,
             activation=activation(hf.get('activation_function', 'gelu_new')),
             ln_epsilon=hf.get('layer_norm_epsilon', 1e-5), vocab_size=hf['vocab_size'])
  except KeyError as e:
    raise UserError(f'{path} lacks the field {e}, which a {kind} config has') from e
  if c is None:
    raise UserError(f'{path} has model_type {kind!r}; supported: {SUPPORTED}')
  if c['d_model'] % c['num_heads']:
    raise UserError(f"{path}: the model width {c['d_model']} is not a multiple of the {c['num_heads']} heads")
  return c


def _entries(c: dict) -> list[tuple]:
  """(group, our path, HF key, HF shape, our shape, transposed) of every tensor. Group '' is the
  backbone; a head group is loaded when the checkpoint has it. GPT-2's packed c_attn is split first
  into virtual keys 'h.i.attn.c_attn.weight[query]' etc. (see _split_qkv)."""
  d, n, f, v = c['d_model'], c['num_heads'], c['d_ff'], c['vocab_size']
  heads, out = (n, d // n), []

  def dense(group, ours, hf, in_shape, out_shape, transposed, part=''):
    k_in, k_out = math.prod(in_shape), math.prod(out_shape)
    out.append((group, f'{ours}/kernel', f'{hf}.weight{part}', (k_out, k_in) if transposed else (k_in, k_out),
                in_shape + out_shape, transposed))
    out.append((group, f'{ours}/bias', f'{hf}.bias{part}', (k_out,), out_shape, False))

  def norm(group, ours, hf):
    out.extend([(group, f'{ours}/scale', f'{hf}.weight', (d,), (d,), False),
                (group, f'{ours}/bias', f'{hf}.bias', (d,), (d,), False)])

  def table(ours, hf, rows):
    out.append(('', ours, f'{hf}.weight', (rows, d), (rows, d), False))

  if c['name'] == 'bert':
    table('embed/embedding', 'embeddings.word_embeddings', v)
    table('pos_embedding', 'embeddings.position_embeddings', c['max_len'])
    table('type_embedding', 'embeddings.token_type_embeddings', c['type_vocab_size'])
    norm('', 'embed_norm', 'embeddings.LayerNorm')
    for i in range(c['num_layers']):
      ours, hf = f'block_{i}/', f'encoder.layer.{i}.'
      for name in _QKV:
        dense('', f'{ours}self_attention/{name}', f'{hf}attention.self.{name}', (d,), heads, True)
      dense('', f'{ours}self_attention/out', f'{hf}attention.output.dense', heads, (d,), True)
      norm('', f'{ours}self_attention_norm', f'{hf}attention.output.LayerNorm')
      dense('', f'{ours}mlp/wi', f'{hf}intermediate.dense', (d,), (f,), True)
      dense('', f'{ours}mlp/wo', f'{hf}output.dense', (f,), (d,), True)
      norm('', f'{ours}mlp_norm', f'{hf}output.LayerNorm')
    dense('mlm_head', 'mlm_head/transform', 'cls.predictions.transform.dense', (d,), (d,), True)
    norm('mlm_head', 'mlm_head/transform_norm', 'cls.predictions.transform.LayerNorm')
    out.append(('mlm_head', 'mlm_head/bias', 'cls.predictions.bias', (v,), (v,), False))
    dense('cls_head', 'cls_head/pooler', 'pooler.dense', (d,), (d,), True)
  else:
    table('embed/embedding', 'wte', v)
    table('pos_embedding', 'wpe', c['max_len'])
    for i in range(c['num_layers']):
      ours, hf = f'block_{i}/', f'h.{i}.'
      norm('', f'{ours}self_attention_norm', f'{hf}ln_1')
      for name in _QKV:
        dense('', f'{ours}self_attention/{name}', f'{hf}attn.c_attn', (d,), heads, False, part=f'[{name}]')
      dense('', f'{ours}self_attention/out', f'{hf}attn.c_proj', heads, (d,), False)
      norm('', f'{ours}mlp_norm', f'{hf}ln_2')
      dense('', f'{ours}mlp/wi', f'{hf}mlp.c_fc', (d,), (f,), False)
      dense('', f'{ours}mlp/wo', f'{hf}mlp.c_proj', (f,), (d,), False)
    norm('', 'final_norm', 'ln_f')
  return out


def _split_qkv(tensors: dict, d: int) -> dict:
  out = {}
  for key, w in tensors.items():
    if key.endswith(('attn.c_attn.weight', 'attn.c_attn.bias')):
      if w.shape[-1] != 3 * d:
        raise UserError(f'{key} has shape {tuple(w.shape)}, expected a last axis of 3 * n_embd = {3 * d}')
      out.update({f'{key}[{name}]': part for name, part in zip(_QKV, np.split(w, 3, axis=-1))})
    else:
      out[key] = w
  return out


def _join_qkv(tensors: dict) -> dict:
  out = {k: w for k, w in tensors.items() if not k.endswith(']')}
  for key in tensors:
    if key.endswith('[query]'):
      base = key[:-len('[query]')]
      out[base] = np.concatenate([tensors[f'{base}[{name}]'] for name in _QKV], axis=-1)
  return out


def _read_safetensors(path: str) -> dict:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors.numpy.load_file(path)
  except TypeError:  # bfloat16, which numpy lacks: read the simple format itself, with ml_dtypes
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    with open(path, 'rb') as f:
      header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
      data = f.read()
    dtypes = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64}
    return {k: np.frombuffer(data[h['data_offsets'][0]:h['data_offsets'][1]], dtypes[h['dtype']]).reshape(h['shape'])
            for k, h in header.items() if k != '__metadata__' and h['dtype'] in dtypes}
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not read {path}: {e}') from e


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'{path} is a PyTorch checkpoint, which needs torch: pip install torch, or convert it '
                    f'to model.safetensors') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not read {path}: {e}') from e
  return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _read_weights(directory: str) -> dict:
  for name, read in (('model.safetensors', _read_safetensors), ('pytorch_model.bin', _read_torch)):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return read(path)
    if os.path.exists(path + '.index.json'):
      index = _read_json(path + '.index.json')
      files = sorted(set(index.get('weight_map', {}).values()))
      return {k: w for file in files for k, w in read(os.path.join(directory, file)).items()}
  raise UserError(f'{directory} has no weights: expected model.safetensors, model.safetensors.index.json '
                  f'(sharded) or pytorch_model.bin')


def load_params(directory: str, model_name: str) -> dict:
  """The checkpoint's weights as our parameter tree (nested dicts of float32 numpy arrays) for
  model `model_name` ('bert' or 'gpt'): the backbone, plus the heads the checkpoint has."""
  c = model_config(directory)
  if c['name'] != model_name:
    raise UserError(f'{directory} holds a {c["name"]} checkpoint, not one for model {model_name!r}')
  prefix = _PREFIX[model_name]
  tensors = {}
  for key, w in _read_weights(directory).items():
    key = key[len(prefix):] if key.startswith(prefix) else key
    tensors[key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')] = w
  if model_name == 'gpt':
    tensors = _split_qkv(tensors, c['d_model'])
  entries = _entries(c)
  present = {group for group, _, key, *_ in entries if key in tensors}
  flat = {}
  for group, ours, key, hf_shape, our_shape, transposed in entries:
    if group and group not in present:
      continue
    if key not in tensors:
      raise UserError(f'{directory}: the checkpoint lacks {key!r} (for our {ours})')
    w = np.asarray(tensors[key], np.float32)
    if w.shape != hf_shape:
      raise UserError(f'{directory}: {key!r} has shape {w.shape}, but config.json implies {hf_shape}')
    flat[tuple(ours.split('/'))] = np.ascontiguousarray((w.T if transposed else w).reshape(our_shape))
  return traverse_util.unflatten_dict(flat)


def save(directory: str, params, model_config: dict):
  """Writes our BERT (its mlm head and pooler if present) or GPT parameters as a Hugging Face
  checkpoint: config.json and model.safetensors. `model_config` is our config.model ('name' and the
  fields that differ from the model's defaults); sizes are read from the parameters."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from model_zoo.models import registry  # pylint: disable=g-import-not-at-top
  name = model_config.get('name')
  if name not in _PREFIX:
    raise UserError(f"can only save models 'bert' and 'gpt' as Hugging Face checkpoints, not {name!r}")
  get = lambda key: model_config.get(key, getattr(registry.MODELS[name], key))
  flat = {'/'.join(k): np.asarray(w, np.float32)
          for k, w in traverse_util.flatten_dict(nn.unbox(dict(params))).items()}
  if any('_lora_' in k for k in flat):
    raise UserError('the parameters have LoRA adapters, which a Hugging Face BERT/GPT-2 cannot hold')
  num_heads = flat['block_0/self_attention/query/kernel'].shape[1]
  if name == 'gpt':   # checked first: a GPT of another layout (rotary positions) has no pos_embedding
    layout = dict(positional='learned', pre_ln=True, tie_embeddings=True, attention_bias=True)
    bad = {k: get(k) for k, want in layout.items() if get(k) != want}
    if bad or get('num_kv_heads') not in (0, num_heads):
      raise UserError(f'only a GPT-2 layout ({layout}, no grouped-query attention) can be saved as GPT-2; '
                      f'this model has {bad or {"num_kv_heads": get("num_kv_heads")}}')
  v, d = flat['embed/embedding'].shape
  c = dict(name=name, vocab_size=v, d_model=d, num_heads=num_heads,
           d_ff=flat['block_0/mlp/wi/kernel'].shape[1], max_len=flat['pos_embedding'].shape[0],
           num_layers=sum(k.endswith('self_attention/query/kernel') for k in flat),
           activation=get('activation'), ln_epsilon=get('ln_epsilon'))
  if c['activation'] not in _HF_ACTIVATIONS:
    raise UserError(f"activation {c['activation']!r} has no Hugging Face equivalent; "
                    f"supported: {', '.join(_HF_ACTIVATIONS)}")
  if name == 'bert':
    c['type_vocab_size'] = flat['type_embedding'].shape[0]
  tensors = {}
  for group, ours, key, hf_shape, _, transposed in _entries(c):
    if ours not in flat:
      if group:
        continue
      raise UserError(f'the parameters lack {ours}, which a {name} checkpoint needs')
    w = flat[ours].reshape(hf_shape[::-1] if transposed else hf_shape)
    prefix = '' if key.startswith('cls.') else _PREFIX[name]
    tensors[prefix + key] = np.ascontiguousarray(w.T if transposed else w)
  tensors = _join_qkv(tensors)
  hf_act = _HF_ACTIVATIONS[c['activation']]
  if name == 'bert':
    config = dict(architectures=['BertForMaskedLM' if 'mlm_head/bias' in flat else 'BertModel'], model_type='bert',
                  vocab_size=v, hidden_size=d, num_hidden_layers=c['num_layers'], num_attention_heads=c['num_heads'],
                  intermediate_size=c['d_ff'], hidden_act=hf_act, max_position_embeddings=c['max_len'],
                  type_vocab_size=c['type_vocab_size'], layer_norm_eps=c['ln_epsilon'], pad_token_id=0,
                  tie_word_embeddings=True)
  else:
    end = 50256 if v == 50257 else None  # GPT-2's <|endoftext|>; another vocabulary's is unknown here
    config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=v, n_embd=d,
                  n_layer=c['num_layers'], n_head=c['num_heads'], n_inner=c['d_ff'], n_positions=c['max_len'],
                  activation_function=hf_act, layer_norm_epsilon=c['ln_epsilon'], bos_token_id=end,
                  eos_token_id=end, tie_word_embeddings=True)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  safetensors.numpy.save_file(tensors, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
