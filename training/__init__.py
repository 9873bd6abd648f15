"""LoRA fine-tuning on Ray Train (see README: not built yet; tracked in its issue)."""
