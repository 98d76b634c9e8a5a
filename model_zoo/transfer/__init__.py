"""Transfer learning: start from pretrained weights (ours or Hugging Face's), freeze, adapt."""
