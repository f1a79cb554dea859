"""LoRA adapters on one base model: PEFT folders loaded and checked (lora.py), named and counted
(registry.py), stacked per step for the adapters a batch uses (batch.py), applied by the model (ops.py).

Imports only torch, safetensors and parley.types/config: the model sees per-step tensors, never requests.
"""
