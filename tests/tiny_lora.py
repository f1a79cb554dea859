"""LoRA adapters made with `peft` for tests, and the merged models they are checked against."""

from __future__ import annotations

import torch

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(base, path, *, r: int = 4, alpha: float = 8, targets=ALL_MODULES, seed: int = 1,
                      std: float = 0.1, **config) -> str:
    """Save a PEFT LoRA adapter for `base` (an HF folder, or a loaded transformers model) to `path`.
    PEFT starts B at zero; here every A and B is random, so the adapter changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str) else base
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **config)
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(path), safe_serialization=True)
    peft_model.unload()  # give `model` back its plain layers
    return str(path)


def merged_model(base, adapter_dir: str):
    """`base` (an HF folder, or a loaded transformers model) with the adapter merged into its weights
    by peft: the reference output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str) else base
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
