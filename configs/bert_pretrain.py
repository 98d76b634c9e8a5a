"""BERT masked-LM pretraining. Sizes: tiny (CPU default), base, large (the paper's shapes).

  python train.py --config=configs/bert_pretrain.py --workdir=runs/bert
  python train.py --config=configs/bert_finetune.py --workdir=runs/cls --config.init_from=runs/bert

The offline corpus is the training split of `pydoc_topics`: 40-word passages of the CPython
documentation (the GPT corpus, de-duplicated), so the fine-tuning task's test passages stay
unseen. A SentencePiece vocabulary with a <mask> token is trained on it into the workdir, and
fine-tuning from this workdir reuses it. 15% of tokens are masked, 80/10/10 (see
model_zoo/data/text_classification.py).
"""
from model_zoo.config import base_config, options

# num_layers, d_model, num_heads, d_ff: tiny for CPUs and tests; base and large are the paper's.
SIZES = {'tiny': (4, 128, 4, 512), 'base': (12, 768, 12, 3072), 'large': (24, 1024, 16, 4096)}


def bert_config(size: str, task: str):
  """What pretraining and fine-tuning share: the data set, tokenizer and model shape."""
  num_layers, d_model, num_heads, d_ff = SIZES[size]
  config = base_config()
  config.task = task
  config.dataset.name = 'pydoc_topics'
  config.dataset.tokenizer = 'sentencepiece'    # sentencepiece (trained here) | hf:<dir> (set by init_from=hf:)
  config.dataset.vocab_size = 2048 if size == 'tiny' else 30522
  config.dataset.seq_len = 96 if size == 'tiny' else 128
  config.dataset.mlm_probability = 0.0
  config.dataset.labels_per_class = 0           # pydoc_topics: > 0 keeps that many labelled training passages a class
  config.model.name = 'bert'
  config.model.num_layers = num_layers
  config.model.d_model = d_model
  config.model.num_heads = num_heads
  config.model.d_ff = d_ff
  config.model.max_len = 512
  config.model.type_vocab_size = 2
  config.model.activation = 'gelu_exact'
  config.model.ln_epsilon = 1e-12
  config.model.dropout_rate = 0.1
  config.model.lora_rank = 0
  config.model.lora_alpha = 16.0
  config.model.dtype = 'float32' if size == 'tiny' else 'bfloat16'
  config.model.attention_impl = ''            # '' (XLA) | xla | cudnn (a GPU, bfloat16)
  config.model.scan_layers = False            # True: one nn.scan over the blocks
  config.model.remat_policy = 'none'          # none | full | dots | qkv | attention | attention_mlp
  return config


def get_config(arg: str = ''):
  size = options(arg, 'configs/bert_pretrain.py', size=SIZES)['size']
  config = bert_config(size, 'masked_lm')
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.mlm_probability = 0.15
  config.batch_size = 64 if size == 'tiny' else 256
  config.num_train_steps = 1500 if size == 'tiny' else 1_000_000
  config.log_every_steps = 100
  config.eval_every_steps = 500 if size == 'tiny' else 10_000
  config.checkpoint_every_steps = 500 if size == 'tiny' else 10_000
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 5e-4 if size == 'tiny' else 1e-4
  config.optimizer.schedule = 'warmup_linear'
  config.optimizer.warmup_steps = 150 if size == 'tiny' else 10_000
  config.optimizer.weight_decay = 0.01
  config.optimizer.b2 = 0.999
  config.lock()
  return config
