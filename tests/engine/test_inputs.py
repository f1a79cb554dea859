"""A sequence's sampling row (parley/engine/inputs.py): what the sampler sees of its history."""

from types import SimpleNamespace

import torch

from parley.engine.inputs import StepInputs
from parley.engine.sequence import Sequence
from parley.sampling.metadata import SamplingBatch
from parley.types import SamplingParams, StoppingCriteria

EOS = 0


def sequence(params: SamplingParams, stopping: StoppingCriteria = StoppingCriteria(), output=()):
    request = SimpleNamespace(request=SimpleNamespace(sampling=params, stopping=stopping))
    seq = Sequence([1, 2, 3], group=request)
    seq.token_ids += output
    inputs = StepInputs({seq.seq_id: SimpleNamespace(generator=None)}, 100, frozenset({EOS}), torch.device("cpu"))
    return inputs, seq


def test_a_draft_positions_row_takes_the_drafts_before_it_as_output():
    params = SamplingParams(frequency_penalty=0.5, repetition_penalty=1.2)
    inputs, seq = sequence(params, StoppingCriteria(max_new_tokens=10, min_new_tokens=3), output=[7])
    rows = [inputs.sampling_row(seq, drafted) for drafted in ([], [8], [8, 9])]
    assert [r.output_ids for r in rows] == [[7], [7, 8], [7, 8, 9]]
    assert all(r.prompt_ids == [1, 2, 3] for r in rows)
    assert [r.suppressed_ids for r in rows] == [(EOS,), (EOS,), ()]  # the third comes after 3 tokens: min_new_tokens
    assert seq.output_ids == [7]


def test_the_watermark_follows_the_last_prompt_token_before_any_output():
    inputs, seq = sequence(SamplingParams(watermark=True))
    assert SamplingBatch.build([inputs.sampling_row(seq)], 100, "cpu").watermark == [(0, 3)]
    seq.token_ids.append(42)
    assert SamplingBatch.build([inputs.sampling_row(seq)], 100, "cpu").watermark == [(0, 42)]
    assert SamplingBatch.build([inputs.sampling_row(seq, [43])], 100, "cpu").watermark == [(0, 43)]
