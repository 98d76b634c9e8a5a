"""Model families (pure flax.linen modules), their shared parts and the model protocol."""
