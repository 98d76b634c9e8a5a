"""DCGAN (Radford et al., 2015): a convolutional generator and discriminator for small images.

  G: z ~ N(0, I) -> dense -> [H/4, W/4, 2F] -> transposed conv /2 -> [H/2, W/2, F]
     -> transposed conv /2 -> [H, W, C] -> sigmoid        (batch norm and ReLU inside)
  D: x -> conv /2 -> leaky ReLU -> [+ minibatch std channel] -> conv /2 -> leaky ReLU -> dense
     -> logit of "real"
The minibatch standard deviation (Karras et al., 2018, section 3): the mean over features and
positions of the standard deviation over the batch, appended as a constant feature map, so that
D sees when a batch of samples lacks variety and G is pushed away from collapsing onto one mode.
The adversarial game of Goodfellow et al. (2014), min_G max_D E[log D(x)] + E[log(1 - D(G(z)))],
is trained with the non-saturating generator loss -log D(G(z)); see model_zoo.tasks.gan.
Images are in [0, 1]; H and W must be multiples of 4. Names: G's first layer (z to the smallest
feature map) is `generator/stem`, its upsampling block `generator/block_0`, its output layer
`generator/pixel_head`; D's convs are `discriminator/block_0` and `block_1`, its output
`discriminator/logit_head`. Shape letters: Z latents, C channels (F = `features` of the networks).
"""
import flax.linen as nn
import jax.numpy as jnp

from model_zoo.models import layers


class UpBlock(nn.Module):
  """Transposed conv with stride 2 (doubles H and W), batch norm, ReLU."""
  features: int

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    x = layers.conv(self.features, 4, 2, transpose=True)(x_BxHxWxC)
    return nn.relu(layers.batch_norm(train=train)(x))


class Generator(nn.Module):
  image_shape: tuple          # (H, W, C)
  features: int = 64

  @nn.compact
  def __call__(self, z_BxZ, *, train: bool):
    h, w, c = self.image_shape
    f = self.features
    x = layers.linear(h // 4 * w // 4 * 2 * f, 'stem')(z_BxZ)
    x_BxH4xW4x2F = nn.relu(layers.batch_norm(train=train, name='stem_norm')(x.reshape(-1, h // 4, w // 4, 2 * f)))
    x_BxH2xW2xF = UpBlock(f, name='block_0')(x_BxH4xW4x2F, train=train)
    return nn.sigmoid(layers.conv(c, 4, 2, transpose=True, name='pixel_head')(x_BxH2xW2xF))


class Discriminator(nn.Module):
  features: int = 64
  minibatch_std: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    del train
    x_BxH2xW2xF = nn.leaky_relu(layers.conv(self.features, 4, 2, name='block_0')(x_BxHxWxC), 0.2)
    if self.minibatch_std:  # one more channel, everywhere the batch's mean standard deviation
      std = jnp.mean(jnp.sqrt(jnp.var(x_BxH2xW2xF, axis=0) + 1e-8))
      x_BxH2xW2xF = jnp.concatenate([x_BxH2xW2xF, jnp.full(x_BxH2xW2xF.shape[:3] + (1,), std)], -1)
    x = nn.leaky_relu(layers.conv(2 * self.features, 4, 2, name='block_1')(x_BxH2xW2xF), 0.2)
    return layers.linear(1, 'logit_head', axes=('embed', None))(x.reshape(x.shape[0], -1))[:, 0]


class DCGAN(nn.Module):
  """Both networks; parameters under 'generator' and 'discriminator', each with its own optimizer."""
  image_shape: tuple
  latent_dim: int = 32
  generator_features: int = 64
  discriminator_features: int = 64
  minibatch_std: bool = True

  def setup(self):
    h, w, _ = self.image_shape
    if h % 4 or w % 4:
      raise ValueError(f'DCGAN needs image sides that are multiples of 4, got {self.image_shape}')
    self.generator = Generator(tuple(self.image_shape), self.generator_features)
    self.discriminator = Discriminator(self.discriminator_features, self.minibatch_std)

  def generate(self, z_BxZ, *, train: bool):
    return self.generator(z_BxZ, train=train)

  def discriminate(self, x_BxHxWxC, *, train: bool):
    return self.discriminator(x_BxHxWxC, train=train)

  def __call__(self, z_BxZ, x_BxHxWxC, *, train: bool):
    """Both networks once (for init): -> (G(z), D(x))."""
    return self.generate(z_BxZ, train=train), self.discriminate(x_BxHxWxC, train=train)
