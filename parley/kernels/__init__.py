"""Tensor ops shared by the model and the LoRA adapters, chosen per device and dtype."""
