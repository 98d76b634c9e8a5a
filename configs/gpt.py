"""GPT decoder language model. Presets by size: tiny (CPU default), small, 124m, 350m, 1b.

  python train.py --config=configs/gpt.py --workdir=runs/gpt                 # offline: CPython docs corpus
  python eval.py  --config=configs/gpt.py --workdir=runs/gpt --mode=sample --prompt="The with statement"
  python train.py --config=configs/gpt.py:size=124m --workdir=runs/gpt2 --config.dataset.name=lm1b
"""
from model_zoo.config import base_config, options

# num_layers, d_model, num_heads, d_ff, seq_len, batch_size, vocab_size
PRESETS = {
    'tiny': (4, 256, 4, 1024, 128, 32, 4096),   # ~10 min on 2 CPU cores
    'small': (6, 512, 8, 2048, 256, 32, 4096),
    '124m': (12, 768, 12, 3072, 1024, 256, 32768),    # GPT-2 small shapes
    '350m': (24, 1024, 16, 4096, 1024, 256, 32768),   # GPT-2 medium shapes
    '1b': (24, 2048, 16, 8192, 1024, 256, 32768),     # GPT-3 XL shapes (1.3B)
}
# Rows one device computes at once, so that a step fits one 80 GB GPU: batch_size is then reached by more devices
# or by gradient accumulation (124m: 16 micro-batches of 16 rows on one GPU, 2 on eight). Compiled for 8 fake CPU
# devices, data parallel (each device holding the whole state, as one GPU does): 34 GB, 20 GB and 40 GB a device
# (python benchmarks/scale_probe.py --sizes=124m,350m,1b --meshes=data --depth='' --per_device).
PER_DEVICE_BATCH = {'124m': 16, '350m': 32, '1b': 32}


def get_config(arg: str = ''):
  size = options(arg, 'configs/gpt.py', size=PRESETS)['size']
  num_layers, d_model, num_heads, d_ff, seq_len, batch_size, vocab_size = PRESETS[size]
  config = base_config()
  config.task = 'language_modeling'
  config.dataset.name = 'pydoc'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.tokenizer = 'sentencepiece'   # bytes | sentencepiece (trained on the train split)
  config.dataset.vocab_size = vocab_size
  config.dataset.seq_len = seq_len

  config.model.name = 'gpt'
  config.model.num_layers = num_layers
  config.model.d_model = d_model
  config.model.num_heads = num_heads
  config.model.num_kv_heads = 0                 # 0: one per query head; fewer: grouped-query attention
  config.model.d_ff = d_ff
  config.model.max_len = seq_len
  config.model.positional = 'rotary'            # learned | sinusoidal | rotary
  config.model.activation = 'gelu'              # gelu | relu | swiglu
  config.model.pre_ln = True
  config.model.tie_embeddings = True
  config.model.attention_bias = False           # biases on q, k, v and the attention output (GPT-2 has them)
  # The offline corpus is small (~130k training tokens): the tiny model needs strong dropout.
  config.model.dropout_rate = 0.3 if size == 'tiny' else 0.0
  config.model.dtype = 'float32' if size in ('tiny', 'small') else 'bfloat16'
  config.model.attention_impl = ''              # '' (XLA) | xla | cudnn (a GPU, bfloat16)
  # The big presets scan their blocks: compile time flat in depth, and remat that XLA's scheduler keeps (unrolled,
  # it recomputes but holds the memory anyway: benchmarks/README.md, the scale probe).
  config.model.scan_layers = size in ('350m', '1b')
  config.model.remat_policy = 'full' if size in ('350m', '1b') else 'none'   # none | full | dots | qkv | attention | attention_mlp
  config.model.lora_rank = 0                    # > 0: LoRA adapters on the attention projections
  config.model.lora_alpha = 16.0

  config.batch_size = batch_size
  config.per_device_batch_size = PER_DEVICE_BATCH.get(size, 0)   # 0: batch_size split over the devices
  # > 0: the cross-entropy over the vocabulary in this many pieces of the sequence, each piece's logits recomputed
  # in the backward pass: [B, T / loss_chunks, V] of them alive at a time instead of [B, T, V].
  config.loss_chunks = 0
  if size == '1b':   # parameters, gradients and AdamW's moments split over every device (FSDP)
    config.mesh.data, config.mesh.fsdp = 1, -1
  config.num_train_steps = 400 if size == 'tiny' else 100_000
  config.log_every_steps = 25 if size == 'tiny' else 100
  config.eval_every_steps = 200 if size == 'tiny' else 5000
  config.checkpoint_every_steps = 200 if size == 'tiny' else 5000
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-3 if size == 'tiny' else 6e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 50 if size == 'tiny' else 2000
  config.optimizer.end_learning_rate_factor = 0.1
  config.optimizer.weight_decay = 0.1
  config.optimizer.b2 = 0.95
  config.optimizer.grad_clip_norm = 1.0
  config.lock()
  return config


def sweep(arg: str = ''):
  """python sweep.py --config=configs/gpt.py[:size=...]: the peak learning rate, around each size's default."""
  size = options(arg, 'configs/gpt.py', size=PRESETS)['size']
  rates = (1e-3, 3e-3, 1e-2) if size == 'tiny' else (3e-4, 6e-4, 1.2e-3)
  return [{'optimizer.learning_rate': lr} for lr in rates]
