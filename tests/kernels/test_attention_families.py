"""The windowed families take the attention kernel in bfloat16 (sliding windows; Gemma 2's soft cap),
through the whole engine: split KV layout, released blocks, chunked prefill. Their prompt logprobs
are as close to transformers' float32 ones as the torch path's are."""

import pytest
import torch
from tiny_model import make_tiny_model, start_tiny_engine

from parley.kernels import attention as kernel
from parley.models import attention
from parley.types import FinalEvent, GenerationRequest, StoppingCriteria

# head_dim 32: the kernel's smallest; windows of 16 tokens, which the ~60-token prompt runs far past
FAMILIES = {
    "mistral": ("mistral", {"sliding_window": 16}),
    "gemma2": ("gemma2", {"sliding_window": 16}),
    "gemma3": ("gemma3", {"sliding_window": 16}),
}
PROMPT = ("The user asked a question and the assistant gave a helpful answer. Once upon a time there was a "
          "little model that went on a journey of a thousand miles, and the weather was fine all the way.")

pytestmark = pytest.mark.skipif(not kernel.available("cpu", torch.bfloat16, 4, 2, 32, 16), reason="no AVX512-BF16")


async def prompt_logprobs(path: str) -> list[float]:
    engine = start_tiny_engine(path, dtype="bfloat16", block_size=16, max_batch_prefill_tokens=16, max_batch_size=8)
    try:
        request = GenerationRequest(PROMPT, stopping=StoppingCriteria(max_new_tokens=1), decoder_input_details=True)
        async for event in engine.generate(request):
            if isinstance(event, FinalEvent):
                return [t.logprob for t in event.prefill[1:]]
    finally:
        engine.core.stop()


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_windowed_families_on_the_kernel_are_as_close_to_float32_as_the_torch_path(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, overrides = FAMILIES[family]
    path = make_tiny_model(tmp_path, arch, head_dim=32, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
    assert len(ids) > 48
    with torch.inference_mode():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    calls = []
    attend = kernel.attend
    monkeypatch.setattr(kernel, "attend", lambda *args: calls.append(args[-3:-1]) or attend(*args))  # window, softcap
    on_kernel = torch.tensor(await prompt_logprobs(path))
    windows = {window for window, _ in calls}
    assert calls and 16 in windows  # every layer ran on the kernel, the sliding ones with their window
    monkeypatch.setattr(attention, "use_kernel", lambda q, k_cache: False)
    on_torch = torch.tensor(await prompt_logprobs(path))

    assert on_kernel.shape == on_torch.shape == expected.shape
    kernel_error, torch_error = (on_kernel - expected).abs().max(), (on_torch - expected).abs().max()
    assert kernel_error <= 1.5 * torch_error + 0.01, (kernel_error, torch_error)
