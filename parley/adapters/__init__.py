"""LoRA adapters on one base model: PEFT folders loaded and checked (lora.py), named and counted
(registry.py), batched per step for the adapters a batch uses (batch.py: token blocks for the CPU
kernel, or stacked weights), applied by the model (ops.py).

Imports only torch, safetensors and parley.types/config/kernels: the model sees per-step tensors, never requests.
"""
