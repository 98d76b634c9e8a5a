"""BERT fine-tuning for sequence classification, from our pretraining run or Hugging Face weights.

  python train.py --config=configs/bert_finetune.py --workdir=runs/cls --config.init_from=runs/bert
  python train.py --config=configs/bert_finetune.py --workdir=runs/sst2 --config.dataset.name=glue/sst2 \\
      --config.dataset.eval_split=validation --config.init_from=hf:/path/to/bert-base-uncased --config.freeze=backbone
  python eval.py  --config=configs/bert_finetune.py --workdir=runs/cls

Offline default: `pydoc_topics`, which of 22 CPython documentation topics a 40-word passage is from
(test passages unseen in pretraining and fine-tuning), learnt from 8 labelled passages a topic
(`--config.dataset.labels_per_class=0` for all 723). Without init_from the same model trains
from scratch. Options: freeze=backbone (train the new head only), optimizer.layer_decay < 1
(layer-wise lr decay), model.lora_rank > 0 (LoRA adapters; `eval.py --mode=export` writes the
merged weights). With init_from=hf:<dir> the model's shape and tokenizer are read from that
directory, so the size preset does not matter.

  python train.py --config=configs/bert_finetune.py:head=tokens --config.init_from=runs/bert   # per-token labels
"""
from configs import bert_pretrain
from model_zoo.config import options


def get_config(arg: str = ''):
  chosen = options(arg, 'configs/bert_finetune.py', size=bert_pretrain.SIZES, head=('classify', 'tokens'))
  size = chosen['size']
  if chosen['head'] == 'tokens':  # a label per token: pydoc_topic_spans, rows of two passages
    config = bert_pretrain.bert_config(size, 'token_classification')
    config.dataset.name = 'pydoc_topic_spans'
    config.dataset.seq_len = 2 * config.dataset.seq_len
  else:
    config = bert_pretrain.bert_config(size, 'text_classification')
    config.model.pooling = 'cls'                # cls (BERT's pooler on [CLS]) | mean (over real tokens)
    # Few labels, where pretraining pays: 8 labelled passages a topic (176 in all); 0 = all 723.
    config.dataset.labels_per_class = 8
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.batch_size = 32
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 5e-4 if size == 'tiny' else 3e-5
  config.optimizer.schedule = 'warmup_linear'
  config.optimizer.warmup_steps = 60
  config.optimizer.weight_decay = 0.01
  config.lock()
  return config
