"""model_zoo: config-driven JAX/Flax models with one training loop."""
