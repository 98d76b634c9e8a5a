"""Reconstruction: the autoencoder (squared error) and the VAE (negative ELBO).

Autoencoder: loss = mean over batch and pixels of (x - x_hat)^2. eval.json: `mse`, the squared
error per pixel averaged over the eval split.

VAE (equations in model_zoo.models.vae). Signs: `reconstruction` = E_q[-log p(x|z)] (the negative
log-likelihood, >= 0 for the Bernoulli decoder), `kl` = KL(q(z|x) || N(0, I)) (>= 0), and
`elbo` = -(reconstruction + kl); all in nats per example (summed over pixels and latents, averaged
over examples). The training `loss` is the negative ELBO, reconstruction + kl, with one sample
z = mu + sigma * eps per example, eps drawn from the step's `rng`. eval.json: `elbo`, `kl` (in
closed form), `reconstruction` (the mean over EVAL_SAMPLES draws of eps from a fixed key, so eval
is deterministic), and `mse` per pixel of the decoder mean at z = mu, comparable with the autoencoder's.

eval.py also writes, via `decode_metrics`: reconstructions.png (test images above their
reconstructions), interpolation.png (decoded points on the line between the latents of two test
images) and, for the VAE, samples.png (decoder means at z ~ N(0, I)).
"""
import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.data.base import Dataset
from model_zoo.errors import UserError
from model_zoo.evaluation import plots
from model_zoo.models import registry
from model_zoo.tasks import losses
from model_zoo.tasks.base import Input, Serving, SupervisedTask, example_spec
from model_zoo.training.state import TrainState

EVAL_SEED = 0       # the eval noise (eps, prior samples): fixed, the same for every run and step
EVAL_SAMPLES = 8    # draws of z per test image for the VAE's reconstruction term
INTERPOLATION_STEPS = 8


class _ReconstructionTask(SupervisedTask):
  """Batches hold `image` with pixels in [0, 1]; labels, if any, only choose the images to plot."""
  reconstruction_title = ''   # how the plotted reconstruction is made
  interpretations = ('latents',)

  def build_model(self):
    self.image_shape = tuple(int(d) for d in np.shape(self.info.example['image']))
    return registry.build(self.config.model, image_shape=self.image_shape)

  def init_state(self, rng, batch):
    params = self.model.init(rng, *self.model_inputs(batch))['params']
    return TrainState.create(params=params, tx=self.tx)

  def encode(self, params, x_BxHxWxC):
    """-> z_BxZ, the latent a test image is reconstructed from."""
    raise NotImplementedError

  def decode(self, params, z_BxZ):
    """-> the image (the mean of p(x|z) for the VAE) that z decodes to."""
    raise NotImplementedError

  def serving(self):
    latent = Input((self.config.model.latent_dim,), np.float32)
    return {'encode': Serving(lambda v, x: {'latent': self.encode(v['params'], x['image'])},
                              {'image': example_spec(self.info.example['image'])}),
            'decode': Serving(lambda v, x: {'image': self.decode(v['params'], x['latent'])}, {'latent': latent})}

  def _squared_error_sum(self, x_BxHxWxC, x_hat_BxHxWxC, mask_B):
    return jnp.sum(jnp.sum((x_BxHxWxC - x_hat_BxHxWxC) ** 2, axis=(1, 2, 3)) * mask_B)

  def decode_splits(self):
    return (self.config.dataset.eval_split,)

  def decode_metrics(self, state, data, workdir, scorers=None, rows=None):
    del scorers, rows
    x_BxHxWxC = _examples(data[self.config.dataset.eval_split])
    encode, decode = jax.jit(self.encode), jax.jit(self.decode)
    z_BxZ = np.asarray(encode(state.params, x_BxHxWxC))
    x_hat_BxHxWxC = np.asarray(decode(state.params, z_BxZ))
    a, b = np.arange(0, 10, 2), np.arange(1, 10, 2)       # pairs of consecutive classes
    t_T = np.linspace(0.0, 1.0, INTERPOLATION_STEPS)
    z_pairs_BxTxZ = z_BxZ[a, None] * (1 - t_T[None, :, None]) + z_BxZ[b, None] * t_T[None, :, None]
    x_pairs_BxTxHxWxC = np.asarray(decode(state.params, z_pairs_BxTxZ.reshape(-1, z_BxZ.shape[-1])))
    x_pairs_BxTxHxWxC = x_pairs_BxTxHxWxC.reshape(len(a), INTERPOLATION_STEPS, *self.image_shape)
    if jax.process_index() == 0:
      rows = [x_BxHxWxC[:10], x_hat_BxHxWxC[:10], x_BxHxWxC[10:], x_hat_BxHxWxC[10:]]
      plots.image_grid(np.concatenate(rows), workdir.reconstructions, columns=10,
                       title=f'test images (rows 1, 3) and their reconstructions (rows 2, 4), '
                             f'{self.reconstruction_title}',
                       row_labels=['original', 'reconstruction'] * 2)
      grid = np.concatenate([x_BxHxWxC[a, None], x_pairs_BxTxHxWxC, x_BxHxWxC[b, None]], axis=1)
      plots.image_grid(grid.reshape(-1, *self.image_shape), workdir.interpolation,
                       columns=INTERPOLATION_STEPS + 2,
                       title=f'test image, {INTERPOLATION_STEPS} decoded points on the line between the '
                             f'latents, test image')
    return {}


class AutoencoderTask(_ReconstructionTask):
  reconstruction_title = 'decoder output'

  def model_inputs(self, batch):
    return (batch['image'],)

  def encode(self, params, x_BxHxWxC):
    return self.model.apply({'params': params}, x_BxHxWxC, method='encode')

  def decode(self, params, z_BxZ):
    return self.model.apply({'params': params}, z_BxZ, method='decode')

  def loss_fn(self, params, model_state, batch, rng):
    del rng
    x_BxHxWxC = batch['image']
    loss = jnp.mean((self.model.apply({'params': params}, x_BxHxWxC) - x_BxHxWxC) ** 2)
    return loss, ({'loss': loss}, model_state)

  def eval_step(self, state, batch):
    x_BxHxWxC, mask_B = batch['image'], batch['mask']
    x_hat_BxHxWxC = self.model.apply({'params': state.params}, x_BxHxWxC)
    return {'squared_error_sum': self._squared_error_sum(x_BxHxWxC, x_hat_BxHxWxC, mask_B),
            'count': jnp.sum(mask_B)}

  def eval_metrics(self, stats):
    return {'mse': float(stats['squared_error_sum'] / (stats['count'] * np.prod(self.image_shape)))}


class VAETask(_ReconstructionTask):
  """`config.likelihood`: 'bernoulli' (decoder logits) or 'gaussian' (decoder mean, std `config.decoder_std`)."""
  reconstruction_title = 'decoder mean at z = mu'

  @classmethod
  def check_config(cls, config):
    if config.likelihood not in ('bernoulli', 'gaussian'):
      raise UserError(f"unknown likelihood {config.likelihood!r} in config.likelihood; known: bernoulli, gaussian")
    if not config.decoder_std > 0:
      raise UserError(f'config.decoder_std must be > 0, got {config.decoder_std}')

  def model_inputs(self, batch):
    x_BxHxWxC = batch['image']
    return x_BxHxWxC, jnp.zeros((x_BxHxWxC.shape[0], self.config.model.latent_dim), x_BxHxWxC.dtype)

  def nll(self, x_BxHxWxC, out_BxHxWxC):
    """-log p(x|z) per example, from the decoder's output."""
    if self.config.likelihood == 'bernoulli':
      return losses.bernoulli_nll(x_BxHxWxC, out_BxHxWxC)
    return losses.gaussian_nll(x_BxHxWxC, out_BxHxWxC, self.config.decoder_std)

  def mean(self, out_BxHxWxC):
    """The mean of p(x|z): the image to show."""
    return jax.nn.sigmoid(out_BxHxWxC) if self.config.likelihood == 'bernoulli' else out_BxHxWxC

  def encode(self, params, x_BxHxWxC):
    return self.model.apply({'params': params}, x_BxHxWxC, method='encode')[0]

  def decode(self, params, z_BxZ):
    return self.mean(self.model.apply({'params': params}, z_BxZ, method='decode'))

  def loss_fn(self, params, model_state, batch, rng):
    x_BxHxWxC = batch['image']
    eps_BxZ = jax.random.normal(rng, (x_BxHxWxC.shape[0], self.config.model.latent_dim), x_BxHxWxC.dtype)
    out_BxHxWxC, mu_BxZ, log_var_BxZ = self.model.apply({'params': params}, x_BxHxWxC, eps_BxZ)
    reconstruction = jnp.mean(self.nll(x_BxHxWxC, out_BxHxWxC))
    kl = jnp.mean(losses.kl_to_standard_normal(mu_BxZ, log_var_BxZ))
    loss = reconstruction + kl
    return loss, ({'loss': loss, 'reconstruction': reconstruction, 'kl': kl}, model_state)

  def eval_step(self, state, batch):
    x_BxHxWxC, mask_B = batch['image'], batch['mask']
    variables = {'params': state.params}
    mu_BxZ, log_var_BxZ = self.model.apply(variables, x_BxHxWxC, method='encode')
    eps_QxBxZ = jax.random.normal(jax.random.key(EVAL_SEED), (EVAL_SAMPLES, *mu_BxZ.shape), mu_BxZ.dtype)

    def reconstruction_B(eps_BxZ):  # the model's own z = mu + sigma * eps, decoded
      return self.nll(x_BxHxWxC, self.model.apply(variables, x_BxHxWxC, eps_BxZ)[0])

    reconstruction_B = jnp.mean(jax.vmap(reconstruction_B)(eps_QxBxZ), axis=0)
    x_hat_BxHxWxC = self.decode(state.params, mu_BxZ)
    return {'reconstruction_sum': jnp.sum(reconstruction_B * mask_B),
            'kl_sum': jnp.sum(losses.kl_to_standard_normal(mu_BxZ, log_var_BxZ) * mask_B),
            'squared_error_sum': self._squared_error_sum(x_BxHxWxC, x_hat_BxHxWxC, mask_B),
            'count': jnp.sum(mask_B)}

  def eval_metrics(self, stats):
    n = stats['count']
    reconstruction, kl = float(stats['reconstruction_sum'] / n), float(stats['kl_sum'] / n)
    return {'elbo': -(reconstruction + kl), 'reconstruction': reconstruction, 'kl': kl,
            'mse': float(stats['squared_error_sum'] / (n * np.prod(self.image_shape)))}

  def decode_metrics(self, state, data, workdir, scorers=None, rows=None):
    del rows
    metrics = super().decode_metrics(state, data, workdir)
    z_BxZ = jax.random.normal(jax.random.key(EVAL_SEED), (100, self.config.model.latent_dim))
    x_BxHxWxC = np.asarray(jax.jit(self.decode)(state.params, z_BxZ))
    if jax.process_index() == 0:
      plots.image_grid(x_BxHxWxC, workdir.samples, columns=10,
                       title='100 samples from the prior: decoder means at z ~ N(0, I)')
    return metrics


def _examples(data: Dataset, per_class: int = 2, num_classes: int = 10) -> np.ndarray:
  """20 images to plot: the first two of each class 0..9 in the split (1st of class 0, ..., 1st of class 9,
  2nd of class 0, ...) if it has labels and those classes among its first 1000 images; else its first 20."""
  n = per_class * num_classes
  if len(data.source) < n:
    raise UserError(f'the eval split has {len(data.source)} images; the plots need {n}')
  examples = [data.preprocess(data.source[i]) for i in range(min(len(data.source), 50 * n))]
  if 'label' in examples[0]:
    by_class = [[ex['image'] for ex in examples if int(ex['label']) == c][:per_class] for c in range(num_classes)]
    if all(len(images) == per_class for images in by_class):
      return np.stack([by_class[c][k] for k in range(per_class) for c in range(num_classes)])
  return np.stack([ex['image'] for ex in examples[:n]])
