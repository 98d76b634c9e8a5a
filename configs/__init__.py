"""One config file per experiment, each with `get_config(arg='')` -> a locked ConfigDict.

Read them with `model_zoo.config.load('configs/gpt.py:size=124m')` (train.py and eval.py do);
a config that builds on another imports it: `from configs import cnn`.
"""
