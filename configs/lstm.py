"""LSTM or GRU (model_zoo/models/rnn.py): a byte-level language model of the CPython documentation
(offline `pydoc`), or the classic pixel-row classifier of the offline `digits` (8 rows of 8 pixels).

  python train.py --config=configs/lstm.py --workdir=runs/lstm                # 1.5-2.5 min on 2 CPU cores
  python eval.py  --config=configs/lstm.py --workdir=runs/lstm                # loss, bits per byte
  python train.py --config=configs/lstm.py:cell=gru --workdir=runs/gru
  python train.py --config=configs/lstm.py:task=classify --workdir=runs/lstm_digits   # ~15 s
  python eval.py  --config=configs/lstm.py:task=classify --workdir=runs/lstm_digits

Measured (Python 3.11.7's pydoc validation split): LSTM 1.462 nats/byte (2.109 bits/byte), GRU 1.444
(2.083); a byte bigram with Witten-Bell smoothing scores 2.632 (3.798). digits test accuracy: LSTM
0.975, GRU 0.980. With 425 kB of training text the model is data-bound: 2 x 256 units or 700 steps
gain at most 0.02 nats/byte for 1.6-1.8x the time.
"""
from model_zoo.config import base_config, options

CELLS = ('lstm', 'gru')
TASKS = ('lm', 'classify')


def get_config(arg: str = ''):
  chosen = options(arg, 'configs/lstm.py', cell=CELLS, task=TASKS)
  cell, task = chosen['cell'], chosen['task']
  config = base_config()
  config.model.cell = cell                      # lstm | gru
  config.optimizer.name = 'adamw'
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.grad_clip_norm = 1.0         # recurrent gradients can explode (Pascanu et al., 2013)
  if task == 'lm':
    config.task = 'language_modeling'
    config.dataset.name = 'pydoc'
    config.dataset.train_split = 'train'
    config.dataset.eval_split = 'validation'
    config.dataset.tokenizer = 'bytes'          # 256 bytes + pad, BOS, EOS
    config.dataset.vocab_size = 259
    config.dataset.seq_len = 256
    config.model.name = 'rnn_lm'
    config.model.num_layers = 2
    config.model.embed_size = 64
    config.model.hidden_size = 192
    config.model.dropout_rate = 0.1
    config.batch_size = 16
    config.num_train_steps = 400                # ~3.8 epochs of the 425 kB training split
    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.optimizer.learning_rate = 2e-2
    config.optimizer.warmup_steps = 30
    config.optimizer.end_learning_rate_factor = 0.1
    config.optimizer.weight_decay = 0.01
  else:
    config.task = 'classification'
    config.dataset.name = 'digits'              # image [B, 8, 8, 1]: 8 steps of 8 pixels
    config.model.name = 'rnn_classifier'
    config.model.num_layers = 1
    config.model.hidden_size = 128
    config.model.dropout_rate = 0.1
    config.batch_size = 64
    config.num_train_steps = 1000
    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 1e-4
  config.lock()
  return config
