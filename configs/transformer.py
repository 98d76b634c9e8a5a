"""The translation Transformer (Vaswani et al., 2017). Presets by size: tiny (CPU default), base, big.

  python train.py --config=configs/transformer.py --workdir=runs/mt          # offline: number words en -> de
  python eval.py  --config=configs/transformer.py --workdir=runs/mt          # BLEU, chrF, exact match
  python eval.py  --config=configs/transformer.py --workdir=runs/mt --mode=translate --input="three hundred and five"
  python train.py --config=configs/transformer.py:size=base --config.dataset.name=wmt14_translate/de-en --workdir=runs/wmt

tiny trains on the generated `numbers` task; base and big are the paper's shapes for WMT'14
(newstest2014 as the test split), with a 32k shared SentencePiece vocabulary.
"""
import ml_collections

from model_zoo.config import base_config, options

# encoder/decoder layers, d_model, num_heads, d_ff, dropout
PRESETS = {
    'tiny': (3, 128, 4, 512, 0.1),
    'base': (6, 512, 8, 2048, 0.1),
    'big': (6, 1024, 16, 4096, 0.3),
}


def get_config(arg: str = ''):
  size = options(arg, 'configs/transformer.py', size=PRESETS)['size']
  num_layers, d_model, num_heads, d_ff, dropout = PRESETS[size]
  tiny = size == 'tiny'
  config = base_config()
  config.task = 'translation'
  config.label_smoothing = 0.1

  config.dataset.name = 'numbers' if tiny else 'wmt14_translate/de-en'
  config.dataset.source_lang = 'en'
  config.dataset.target_lang = 'de'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'    # teacher-forced loss during training
  config.dataset.train_examples = 0           # numbers: 0 = the whole training pool (about 97k)
  config.dataset.tokenizer = 'sentencepiece'  # shared by both languages, trained on the train split
  config.dataset.vocab_size = 512 if tiny else 32768
  config.dataset.src_len = 32 if tiny else 256  # tokens per packed row; longer pairs are left out
  config.dataset.tgt_len = 16 if tiny else 256

  config.model.name = 'transformer'
  config.model.num_encoder_layers = num_layers
  config.model.num_decoder_layers = num_layers
  config.model.d_model = d_model
  config.model.num_heads = num_heads
  config.model.d_ff = d_ff
  config.model.max_len = 256
  config.model.positional = 'sinusoidal'      # sinusoidal | learned
  config.model.activation = 'relu'            # relu | gelu | swiglu
  config.model.pre_ln = False                 # post-LN, as in the paper
  config.model.share_embeddings = True
  config.model.dropout_rate = dropout
  config.model.dtype = 'float32' if tiny else 'bfloat16'
  config.model.attention_impl = ''            # '' (XLA) | xla | cudnn (a GPU, bfloat16)
  config.model.scan_layers = False            # True: one nn.scan over each stack's blocks
  config.model.remat_policy = 'none'          # none | full | dots | qkv | attention | attention_mlp

  # eval.py translates these splits (comma-separated); the first one's metrics are `bleu`,
  # `exact_match`, ..., the others' `<split>/bleu`, ... '' = the data set's: test (and long).
  config.decode = ml_collections.ConfigDict()
  config.decode.splits = ''
  config.decode.beam_size = 4
  config.decode.alpha = 0.6                   # length penalty ((5 + |y|) / 6) ** alpha
  config.decode.max_len = 32 if tiny else 256  # target tokens, EOS included
  # sacrebleu's tokenizer; '' = the data set's: 13a (the standard) for WMT; for numbers 'char',
  # since its German is one compound word per sentence, where word n-grams say nothing.
  config.decode.bleu_tokenize = ''

  # base/big: 96 rows of 256 tokens ~ the paper's 25k source + 25k target tokens per batch.
  config.batch_size = 64 if tiny else 96
  config.num_train_steps = 1500 if tiny else 100_000
  config.log_every_steps = 100
  config.eval_every_steps = 500 if tiny else 5000
  config.checkpoint_every_steps = 500 if tiny else 5000
  config.optimizer.name = 'adam'
  config.optimizer.b2 = 0.98
  config.optimizer.schedule = 'rsqrt'         # lr * min(step / warmup, sqrt(warmup / step))
  # The peak, reached at warmup_steps; base/big: the paper's d_model^-0.5 * warmup^-0.5.
  config.optimizer.learning_rate = 2e-3 if tiny else d_model ** -0.5 * 4000 ** -0.5
  config.optimizer.warmup_steps = 300 if tiny else 4000
  config.lock()
  return config
