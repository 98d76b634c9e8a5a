"""Tasks by name: `config.task` -> a Task class."""
from model_zoo.config import lookup
from model_zoo.data.base import DataInfo
from model_zoo.tasks.base import Task
from model_zoo.tasks.classification import ClassificationTask, TextClassificationTask, TokenClassificationTask
from model_zoo.tasks.gan import GANTask
from model_zoo.tasks.language_modeling import LanguageModelingTask
from model_zoo.tasks.masked_lm import MaskedLMTask
from model_zoo.tasks.reconstruction import AutoencoderTask, VAETask
from model_zoo.tasks.translation import TranslationTask

TASKS = {'classification': ClassificationTask, 'text_classification': TextClassificationTask,
         'token_classification': TokenClassificationTask,
         'masked_lm': MaskedLMTask, 'language_modeling': LanguageModelingTask,
         'translation': TranslationTask, 'gan': GANTask,
         'autoencoder': AutoencoderTask, 'vae': VAETask}


def check(config):
  """A UserError now, before any data is read, if config.task is not a task or its options do not fit it."""
  lookup(TASKS, config.task, 'task', 'task').check_config(config)


def build(config, info: DataInfo) -> Task:
  return lookup(TASKS, config.task, 'task', 'task')(config, info)
