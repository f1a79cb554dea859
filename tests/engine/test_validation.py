"""The engine's own limits (parley/engine/validation.py): each rule is a ValidationError naming the
internal field it is about, its name in GenerationRequest (the API maps the names to each dialect's,
dialects.engine_errors_named)."""

import pytest

from parley.engine.validation import Limits, prepare
from parley.types import GenerationRequest, Grammar, SamplingParams, StoppingCriteria, ValidationError

LIMITS = Limits(max_input_tokens=8, max_total_tokens=12, max_stop_sequences=2, max_top_n_tokens=3, max_n=2,
                vocab_size=50)


class WordTokenizer:
    """One token per word; the BOS token is 1."""

    def encode(self, text, add_special_tokens=True):
        ids = [2 + len(word) for word in text.split()]
        return [1, *ids] if add_special_tokens else ids


def prepared(**kw):
    request = GenerationRequest(kw.pop("prompt", "a b c"), stopping=kw.pop("stopping", StoppingCriteria(max_new_tokens=4)),
                                **kw)
    return prepare(request, WordTokenizer(), LIMITS)


def test_a_valid_request_is_tokenized_and_seeded():
    p = prepared(sampling=SamplingParams(do_sample=True), n=2, seeds=7)
    assert p.prompt_ids == [1, 3, 3, 3] and p.seeds == [7, 8]
    assert prepared(truncate=2).prompt_ids == [3, 3]
    assert prepared().seeds == [None]  # greedy: no generator


@pytest.mark.parametrize("kw, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 99]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": "a " * 9}, "prompt"),  # past max_input_tokens
    ({"stopping": StoppingCriteria(max_new_tokens=9)}, "max_new_tokens"),  # 4 + 9 > 12
    ({"stopping": StoppingCriteria(max_new_tokens=0)}, "max_new_tokens"),
    ({"stopping": StoppingCriteria(max_new_tokens=4, min_new_tokens=5)}, "min_new_tokens"),
    ({"stopping": StoppingCriteria(max_new_tokens=4, stop_sequences=["a", "b", "c"])}, "stop_sequences"),
    ({"stopping": StoppingCriteria(max_new_tokens=4, stop_sequences=[""])}, "stop_sequences"),
    ({"stopping": StoppingCriteria(max_new_tokens=4, extra_eos_token_ids=[50])}, "extra_eos_token_ids"),
    ({"sampling": SamplingParams(do_sample=True, temperature=0.0)}, "temperature"),
    ({"sampling": SamplingParams(top_p=1.5)}, "top_p"),
    ({"sampling": SamplingParams(typical_p=0.0)}, "typical_p"),
    ({"sampling": SamplingParams(top_k=-1)}, "top_k"),
    ({"sampling": SamplingParams(min_p=2.0)}, "min_p"),
    ({"sampling": SamplingParams(repetition_penalty=0.0)}, "repetition_penalty"),
    ({"sampling": SamplingParams(frequency_penalty=3.0)}, "frequency_penalty"),
    ({"sampling": SamplingParams(presence_penalty=-3.0)}, "presence_penalty"),
    ({"sampling": SamplingParams(logit_bias={50: 1.0})}, "logit_bias"),
    ({"sampling": SamplingParams(top_n_tokens=4)}, "top_n_tokens"),
    ({"n": 3}, "n"),
    ({"sampling": SamplingParams(do_sample=True), "n": 2, "seeds": [1, 2, 3]}, "seeds"),
    ({"n": 2, "seeds": [1, 2, 3]}, "seeds"),  # greedy ignores the seeds, but not a list of the wrong length
    ({"sampling": SamplingParams(do_sample=True), "seeds": []}, "seeds"),
    ({"sampling": SamplingParams(do_sample=True), "seeds": [2**64]}, "seeds"),
    ({"sampling": SamplingParams(do_sample=True), "seeds": 2**64}, "seeds"),
    ({"sampling": SamplingParams(do_sample=True), "n": 2, "seeds": [7]}, "seeds"),  # a list is one seed per sequence
    ({"truncate": 0}, "truncate"),
    ({"grammar": Grammar("regex", "a+")}, "grammar"),  # no grammar compiler given
])
def test_each_limit_names_its_field(kw, field):
    with pytest.raises(ValidationError) as info:
        prepared(**kw)
    assert info.value.field == field and f"`{field}`" in str(info.value)
