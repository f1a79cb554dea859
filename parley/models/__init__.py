"""Llama-family models in plain PyTorch, paged attention, and weight loading."""
