"""GAN training: two networks, two optimizers, alternating updates in one jitted step.

The state is {'generator': TrainState, 'discriminator': TrainState}; the loop needs nothing
else. Each step (Goodfellow et al., 2014, with the non-saturating generator loss):
  D: minimise  softplus(-D(x)) + softplus(D(G(z)))       = -log D(x) - log(1 - D(G(z)))
  G: minimise  softplus(-D(G(z')))                        = -log D(G(z'))   (with the updated D)
D outputs logits; softplus(-l) = -log sigmoid(l).

Eval: the discriminator's mean output on real test images and on generated ones; eval.py also
generates `config.eval_samples` images, writes a grid of them, and scores them with a classifier
of the same data: `confident_share`, the share of samples it assigns to a class with probability
>= 0.9, and `class_spread`, the entropy of the predicted-class histogram over log(number of
classes) (1.0 = every class equally often; 0 = one class). The classifier is a scorer (see
model_zoo.tasks.base): the run in `config.classifier_workdir` ('' = <workdir>/classifier), whose
config is `config.classifier` with this config's data set; eval.py trains it there first if it
has no checkpoint, and passes its predictions to `decode_metrics`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.models import registry
from model_zoo.tasks import losses
from model_zoo.tasks.base import Input, Serving, Task, quantization_aware
from model_zoo.training import optimizers
from model_zoo.training.state import TrainState
from model_zoo.transfer import finetune

CONFIDENT = 0.9


class GANTask(Task):
  """Batches hold `image` in [0, 1]; labels, if any, are not used."""

  @classmethod
  def check_config(cls, config):
    optimizers.check(config.discriminator_optimizer, config.num_train_steps, 'discriminator_optimizer')
    if config.grad_accum_steps != 1:
      raise UserError(f'config.grad_accum_steps={config.grad_accum_steps} does not apply to the GAN, whose '
                      f'discriminator and generator updates alternate on whole batches; set it to 1')
    if config.per_device_batch_size:
      raise UserError(f'config.per_device_batch_size={config.per_device_batch_size} (gradient accumulation) does not '
                      f'apply to the GAN, whose discriminator and generator updates alternate on whole batches; set '
                      f'it to 0 and choose config.batch_size')

  def __init__(self, config, info):
    super().__init__(config, info)
    image_shape = tuple(int(d) for d in np.shape(info.example['image']))
    self.model = quantization_aware(registry.build(config.model, image_shape=image_shape), config)
    frozen = finetune.frozen_fn(config)
    self.g_tx = optimizers.build(config.optimizer, config.num_train_steps, frozen=frozen)
    self.d_tx = optimizers.build(config.discriminator_optimizer, config.num_train_steps, frozen=frozen)

  def _latents(self, rng, n):
    return jax.random.normal(rng, (n, self.config.model.latent_dim), jnp.float32)

  def init_state(self, rng, batch):
    init_rng, z_rng = jax.random.split(rng)
    x = batch['image']
    return self.with_variables(None, self.model.init(init_rng, self._latents(z_rng, x.shape[0]), x, train=False))

  def variables(self, state):
    g, d = state['generator'], state['discriminator']
    return {'params': {'generator': g.params, 'discriminator': d.params},
            'batch_stats': {'generator': g.model_state['batch_stats']}}

  def with_variables(self, state, variables):
    del state
    params = variables['params']
    return {'generator': TrainState.create(params=params['generator'], tx=self.g_tx,
                                           model_state={'batch_stats': variables['batch_stats']['generator']}),
            'discriminator': TrainState.create(params=params['discriminator'], tx=self.d_tx)}

  def generate(self, g_params, g_model_state, z_BxZ, *, train: bool):
    """-> (images, the generator's model_state, updated by this batch if training)."""
    variables = {'params': {'generator': g_params}, 'batch_stats': {'generator': g_model_state['batch_stats']}}
    if not train:
      return self.model.apply(variables, z_BxZ, train=False, method='generate'), g_model_state
    x, updates = self.model.apply(variables, z_BxZ, train=True, method='generate', mutable=['batch_stats'])
    return x, {'batch_stats': updates['batch_stats']['generator']}

  def discriminate(self, d_params, x_BxHxWxC):
    return self.model.apply({'params': {'discriminator': d_params}}, x_BxHxWxC, train=True, method='discriminate')

  def train_step(self, state, batch, rng):
    g, d = state['generator'], state['discriminator']
    real = batch['image']
    d_rng, g_rng = jax.random.split(rng)
    fake, _ = self.generate(g.params, g.model_state, self._latents(d_rng, real.shape[0]), train=True)
    fake = jax.lax.stop_gradient(fake)

    def d_loss_fn(d_params):
      real_logits_B, fake_logits_B = self.discriminate(d_params, real), self.discriminate(d_params, fake)
      loss = losses.discriminator_loss(real_logits_B, fake_logits_B)
      return loss, (jnp.mean(jax.nn.sigmoid(real_logits_B)), jnp.mean(jax.nn.sigmoid(fake_logits_B)))

    (d_loss, (d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d.params)
    d = d.apply_gradients(d_grads)

    def g_loss_fn(g_params):
      x, model_state = self.generate(g_params, g.model_state, self._latents(g_rng, real.shape[0]), train=True)
      return losses.generator_loss(self.discriminate(d.params, x)), model_state

    (g_loss, g_model_state), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g.params)
    g = g.apply_gradients(g_grads, g_model_state)
    metrics = {'d_loss': d_loss, 'g_loss': g_loss, 'd_real': d_real, 'd_fake': d_fake,
               'd_grad_norm': optax.tree.norm(d_grads), 'g_grad_norm': optax.tree.norm(g_grads)}
    return {'generator': g, 'discriminator': d}, metrics

  def eval_step(self, state, batch):
    g, d = state['generator'], state['discriminator']
    real, mask_B = batch['image'], batch['mask']
    fake, _ = self.generate(g.params, g.model_state, self._latents(jax.random.key(0), real.shape[0]), train=False)
    return {'d_real_sum': jnp.sum(jax.nn.sigmoid(self.discriminate(d.params, real)) * mask_B),
            'd_fake_sum': jnp.sum(jax.nn.sigmoid(self.discriminate(d.params, fake)) * mask_B),
            'count': jnp.sum(mask_B)}

  def eval_metrics(self, stats):
    return {'d_real': float(stats['d_real_sum'] / stats['count']),
            'd_fake': float(stats['d_fake_sum'] / stats['count'])}

  def serving(self):
    """The generator alone: latents z ~ N(0, I) to images."""
    def generate(g, inputs):
      return {'image': self.generate(g['params'], {'batch_stats': g['batch_stats']}, inputs['latent'], train=False)[0]}
    return {'generate': Serving(
        generate, {'latent': Input((self.config.model.latent_dim,), np.float32)},
        weights_of=lambda v: {'params': v['params']['generator'], 'batch_stats': v['batch_stats']['generator']})}

  def samples(self, state, n: int, seed: int = 0):
    g = state['generator']
    return self.generate(g.params, g.model_state, self._latents(jax.random.key(seed), n), train=False)[0]

  def scorers(self):
    cfg = self.config.classifier.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.dataset = self.config.dataset.copy_and_resolve_references()
    return {'classifier': (cfg, self.config.classifier_workdir)}

  def decode_metrics(self, state, data, workdir, scorers=None, rows=None):
    del data, rows
    images = np.asarray(jax.jit(self.samples, static_argnums=1)(state, self.config.eval_samples))
    probs_BxL = np.asarray(jax.nn.softmax(scorers['classifier']({'image': images}), -1))
    scores = sample_scores(probs_BxL)
    if jax.process_index() == 0:
      order = np.argsort(np.argmax(probs_BxL[:100], -1), kind='stable')   # grouped by predicted class
      plots.image_grid(images[:100][order], workdir.samples,
                       title=f'100 samples, grouped by the classifier\'s class; confident share '
                             f'{scores["confident_share"]:.2f}, class spread {scores["class_spread"]:.2f}')
    counts = np.bincount(np.argmax(probs_BxL, -1), minlength=probs_BxL.shape[1]).tolist()
    print(f'{len(images)} samples: confident share {scores["confident_share"]:.4f}, class spread '
          f'{scores["class_spread"]:.4f}, predicted classes {counts}', flush=True)
    return {**scores, 'class_counts': counts}


def sample_scores(probs_BxL) -> dict[str, float]:
  """confident_share and class_spread (see the module docstring) from class probabilities."""
  probs_BxL = np.asarray(probs_BxL, np.float64)
  c = probs_BxL.shape[1]
  hist_L = np.bincount(np.argmax(probs_BxL, -1), minlength=c) / len(probs_BxL)
  nz = hist_L[hist_L > 0]
  return {'confident_share': float(np.mean(probs_BxL.max(-1) >= CONFIDENT)),
          'class_spread': float(max(0.0, -(nz * np.log(nz)).sum() / np.log(c)))}
