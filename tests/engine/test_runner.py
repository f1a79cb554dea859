"""The model runner alone (parley/engine/runner.py) on a tiny random model in float32: a scheduled
step's tokens go through the paged KV cache in prompt chunks and decodes, and its greedy picks,
prompt logprobs and draft verification match transformers' own forward."""

import pytest
import torch
from tiny_model import make_tiny_model

from parley.engine.block_manager import BlockManager
from parley.engine.runner import ModelRunner
from parley.engine.scheduler import Scheduler
from parley.engine.sequence import Sequence
from parley.models.loader import load_model
from parley.sampling.metadata import SamplingRow
from parley.sampling.sampler import Sampler
from parley.types import SamplingParams

PROMPT = [5, 17, 42, 8, 99, 23, 61, 7, 150, 3, 77]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("runner")), seed=5)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture
def parts(model_dir):
    model, config = load_model(model_dir, torch.float32, "cpu")
    runner = ModelRunner(model, config, Sampler(config.vocab_size, torch.device("cpu")), num_blocks=16,
                         block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    return runner, Scheduler(BlockManager(16, 4), max_batch_size=8, max_batch_prefill_tokens=4)


def greedy_row() -> SamplingRow:
    return SamplingRow(SamplingParams(), None, [], [])


def reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)


def step(runner, scheduler):
    sched = scheduler.schedule()
    sampling = [s.seq for s in sched.scheduled if s.samples and not s.spec_tokens]
    drafting = [[greedy_row()] * (len(s.spec_tokens) + 1) for s in sched.scheduled if s.spec_tokens]
    result = runner.execute(sched, [greedy_row() for _ in sampling], drafting)
    scheduler.update(sched)
    return sched, sampling, result


def test_chunked_prefill_then_decodes_pick_the_reference_argmax(parts, reference):
    runner, scheduler = parts
    seq = Sequence(PROMPT, needs_prompt_logprobs=True)
    scheduler.add(seq)
    prompt_logprobs = []
    while True:  # the prompt in chunks of 4 tokens: only the last chunk samples
        sched, sampling, result = step(runner, scheduler)
        prompt_logprobs += result.prompt_logprobs.get(seq.seq_id, [])
        if sampling:
            break
        assert result.sampled is None
    expected = reference_logprobs(reference, PROMPT)
    assert prompt_logprobs == pytest.approx(expected[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0].tolist(),
                                            abs=1e-4)
    for _ in range(5):
        token = result.sampled.token_ids[0]
        logprobs = reference_logprobs(reference, seq.token_ids)[-1]
        assert token == int(logprobs.argmax()) and result.sampled.logprobs[0] == pytest.approx(float(logprobs[token]),
                                                                                              abs=1e-4)
        seq.token_ids.append(token)
        sched, sampling, result = step(runner, scheduler)
        assert [s.seq for s in sched.decodes] == [seq]


def test_drafts_are_kept_while_they_are_the_reference_argmax(parts, reference):
    runner, scheduler = parts
    seq = Sequence(PROMPT[:4])
    scheduler.add(seq)
    _, _, result = step(runner, scheduler)
    seq.token_ids.append(result.sampled.token_ids[0])
    greedy = list(seq.token_ids)
    for _ in range(3):  # the reference's own continuation, then one wrong token
        greedy.append(int(reference_logprobs(reference, greedy)[-1].argmax()))
    drafts = greedy[len(seq.token_ids):] + [0 if greedy[-1] else 1]
    seq.spec_tokens = drafts
    sched, sampling, result = step(runner, scheduler)
    assert sampling == [] and seq.seq_id in result.verified
    tokens = result.verified[seq.seq_id].token_ids
    after = greedy + [int(reference_logprobs(reference, greedy)[-1].argmax())]
    assert tokens == after[len(seq.token_ids):], "the three right drafts, then the model's own next token"


def test_sampled_drafts_are_kept_while_each_is_the_token_drawn_there(parts):
    """A sampled sequence's draft positions are drawn as one-token steps would draw them: with the
    same seed, a step drafting what a one-token-at-a-time run drew keeps those drafts, draws that
    run's next token after them, and leaves the generator where that run left it."""
    runner, scheduler = parts

    def row(generator):
        return SamplingRow(SamplingParams(do_sample=True, temperature=1.5), generator, [], [])

    def run(scheduler, generator, drafts_after_first=None):
        seq = Sequence(PROMPT[:4])
        scheduler.add(seq)
        while True:
            sched = scheduler.schedule()
            sampling = [s.seq for s in sched.scheduled if s.samples and not s.spec_tokens]
            result = runner.execute(sched, [row(generator) for _ in sampling],
                                    [[row(generator)] * (len(s.spec_tokens) + 1) for s in sched.scheduled if s.spec_tokens])
            scheduler.update(sched)
            if seq.seq_id in result.verified:
                return result.verified[seq.seq_id].token_ids
            if sampling:
                seq.token_ids.append(result.sampled.token_ids[0])
                if drafts_after_first is not None:
                    seq.spec_tokens = drafts_after_first
                elif len(seq.output_ids) == 5:
                    return seq.output_ids

    plain_generator = torch.Generator().manual_seed(7)
    plain = run(scheduler, plain_generator)
    assert len(set(plain)) > 1, "a spread distribution: the draws decide"
    drafted_generator = torch.Generator().manual_seed(7)
    wrong = (plain[4] + 1) % runner.sampler.vocab_size
    kept = run(Scheduler(BlockManager(16, 4), max_batch_size=8, max_batch_prefill_tokens=4), drafted_generator,
               drafts_after_first=plain[1:4] + [wrong])
    assert kept == plain[1:5], "the three drafts drawn before, then that run's next draw, not the wrong draft"
    assert torch.equal(torch.rand(3, generator=drafted_generator), torch.rand(3, generator=plain_generator))
