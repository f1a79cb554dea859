import math

import pytest
import torch

from parley.kernels import sample as sample_kernel
from parley.sampling import filters
from parley.sampling.metadata import SamplingBatch, SamplingRow
from parley.sampling.sampler import Sampler, inverse_cdf, prompt_logprobs
from parley.types import SamplingParams

V = 64


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def draw_path(request, monkeypatch):
    """Every test on both paths of a sampled row: the sampling kernel (AVX512-BF16 CPUs: every
    filter but typical_p) and torch's ops (elsewhere, and typical_p)."""
    if request.param == "kernel" and not sample_kernel._supported:
        pytest.skip("the sampling kernel needs AVX512-BF16")
    monkeypatch.setattr(sample_kernel, "available", lambda device: request.param == "kernel")
    return request.param


def make_row(seed=None, prompt=(1, 2), output=(), suppressed=(), **params) -> SamplingRow:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(**params), generator, list(prompt), list(output), suppressed)


def random_logits(rows: int, width: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale


def processed_logprobs(logits: torch.Tensor, row: SamplingRow, allowed=None) -> torch.Tensor:
    """The whole log-distribution the sampler reports for a single row (via top_n_tokens = V)."""
    row.params.top_n_tokens = logits.shape[-1]
    out = Sampler(logits.shape[-1], "cpu")(logits[None], [row], allowed)
    dense = torch.empty(logits.shape[-1])
    dense[torch.tensor(out.top_ids[0])] = torch.tensor(out.top_logprobs[0])
    return dense


def sampled_tokens(logits: torch.Tensor, n: int = 2000, **params) -> torch.Tensor:
    """n draws for one logit row, as a batch of n rows with different seeds."""
    rows = [make_row(seed=i, do_sample=True, **params) for i in range(n)]
    out = Sampler(logits.shape[-1], "cpu")(logits.expand(n, -1).contiguous(), rows)
    return torch.tensor(out.token_ids)


def log_probs(probs: list[float], width: int = V) -> torch.Tensor:
    """Logits with the given leading probabilities, the rest of the mass spread evenly."""
    rest = (1.0 - sum(probs)) / (width - len(probs))
    return torch.tensor(probs + [rest] * (width - len(probs))).log()


# --- greedy, logprobs, top-n -----------------------------------------------------------------


def test_greedy_is_argmax_with_its_logprob():
    logits = random_logits(3)
    out = Sampler(V, "cpu")(logits, [make_row() for _ in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert out.logprobs == expected.tolist()
    assert out.top_ids == [[], [], []]


def test_plain_greedy_batch_builds_nothing():
    batch = SamplingBatch.build([make_row(), make_row(output=[3])], V, "cpu")
    assert not batch.edits_logits and batch.sampled is None and not batch.top_n


def test_greedy_rows_ignore_sampling_parameters():
    logits = random_logits(1)
    row = make_row(temperature=0.01, top_k=3, top_p=0.1, typical_p=0.2, min_p=0.9)
    out = Sampler(V, "cpu")(logits, [row])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_n_tokens_are_ordered_log_softmax_values():
    logits = random_logits(2)
    out = Sampler(V, "cpu")(logits, [make_row(top_n_tokens=5), make_row(top_n_tokens=2)])
    for row, n in ((0, 5), (1, 2)):
        values, ids = logits[row].log_softmax(-1).topk(n)
        assert out.top_ids[row] == ids.tolist()
        assert out.top_logprobs[row] == values.tolist()
        assert out.top_logprobs[row] == sorted(out.top_logprobs[row], reverse=True)


def test_chosen_logprob_is_of_the_processed_logits_before_temperature():
    logits = random_logits(4)
    rows = [
        make_row(seed=i, do_sample=True, temperature=0.3, logit_bias={i: 4.0}) for i in range(4)
    ]
    out = Sampler(V, "cpu")(logits, rows)
    processed = logits.clone()
    processed[range(4), range(4)] += 4.0
    chosen = torch.tensor(out.token_ids)[:, None]
    assert out.logprobs == processed.log_softmax(-1).gather(1, chosen).squeeze(1).tolist()


def test_the_callers_logits_are_left_alone():
    logits = random_logits(3)
    before = logits.clone()
    rows = [make_row(seed=1, do_sample=True, top_k=5), make_row(seed=2, do_sample=True), make_row()]
    Sampler(V, "cpu")(logits, rows)
    Sampler(V, "cpu")(logits[:2], rows[:2])
    Sampler(V, "cpu")(
        logits, [make_row(repetition_penalty=2.0, logit_bias={1: 1.0}) for _ in range(3)]
    )
    assert torch.equal(logits, before)


def test_owned_logits_are_edited_in_place_with_the_same_result():
    def rows():  # the same generator states for each call
        return [make_row(seed=i if i % 2 == 0 else None, do_sample=i % 2 == 0, suppressed=(7,) if i == 1 else (),
                         logit_bias={3: 2.0}, repetition_penalty=1.5) for i in range(3)]

    logits = random_logits(3)
    copied = Sampler(V, "cpu")(logits.clone(), rows())
    assert Sampler(V, "cpu")(logits, rows(), owned=True) == copied
    assert logits[1, 7] == -math.inf  # edited, not copied: the runner's logits, read by nothing after
    assert logits[0, 3] == random_logits(3)[0, 3] + 2.0


def test_prompt_logprobs():
    logits = random_logits(300)  # more rows than one chunk
    next_ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(1))
    expected = logits.log_softmax(-1).gather(1, next_ids[:, None]).squeeze(1)
    assert prompt_logprobs(logits, next_ids) == (expected.tolist(), [])
    chosen, top = prompt_logprobs(logits, next_ids, top_n=3)  # and each row's alternatives (OpenAI echo)
    values, ids = logits.log_softmax(-1).topk(3)
    assert chosen == expected.tolist() and top == list(zip(ids.tolist(), values.tolist()))


# --- sampling and its filters ----------------------------------------------------------------


def test_do_sample_draws_from_the_distribution():
    logits = log_probs([0.5, 0.3, 0.15])
    greedy = Sampler(V, "cpu")(
        logits.expand(50, -1).contiguous(), [make_row(seed=i) for i in range(50)]
    )
    assert set(greedy.token_ids) == {0}
    freq = torch.bincount(sampled_tokens(logits, n=4000), minlength=V).float() / 4000
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]), atol=0.03)


def test_temperature_scales_the_distribution():
    logits = log_probs([0.5, 0.3, 0.15])
    for temperature in (0.5, 2.0):
        expected = (logits / temperature).softmax(-1)
        tokens = sampled_tokens(logits, n=4000, temperature=temperature)
        freq = torch.bincount(tokens, minlength=V).float() / 4000
        assert torch.allclose(freq[:3], expected[:3], atol=0.03), temperature


def test_top_k_keeps_the_k_most_likely():
    logits = random_logits(1, scale=0.5)[0]
    tokens = sampled_tokens(logits, top_k=5)
    assert set(tokens.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_k_keeps_ties_at_the_kth_logit():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0] + [0.0] * (V - 4))
    assert set(sampled_tokens(logits, top_k=2).tolist()) == {0, 1, 2, 3}


# bf16 logits tie exactly more often than one would think (on the default model, after "What is
# the capital of France?", "The" and "L" share logprob -1.9648): tokens 5 and 9 tie at the top here.
TIED = torch.tensor([-5.0] * 5 + [2.0, 1.0, 0.5, 1.5, 2.0] + [-5.0] * (V - 10))


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.001}, {"top_p": 0.2}],
                         ids=lambda p: "=".join(map(str, *p.items())))
def test_a_filter_leaving_one_token_is_greedy_with_argmax_ties(narrowing):
    # each tied token holds ~0.31 of the mass: top_p=0.2 is reached by the first one alone
    assert TIED.argmax().item() == 5
    for temperature in (1.0, 1.7):
        assert set(sampled_tokens(TIED, n=200, temperature=temperature, **narrowing).tolist()) == {5}
    assert set(sampled_tokens(TIED, n=200, top_k=2).tolist()) == {5, 9}  # larger k: ties kept together
    assert set(sampled_tokens(TIED, n=200, top_p=0.5).tolist()) == {5, 9}


def test_top_k_1_and_min_p_1_rows_run_as_greedy_rows():
    batch = SamplingBatch.build([make_row(seed=1, do_sample=True, top_k=1), make_row(seed=2, do_sample=True, min_p=1.0),
                                 make_row(seed=3, do_sample=True, top_k=2)], V, "cpu")
    assert batch.greedy_rows.tolist() == [0, 1] and batch.sampled.rows.tolist() == [2]


def test_extreme_parameters_keep_the_numbers_finite():
    # found by fuzzing the HTTP API: temperature 1e-320 and repetition_penalty 1e-300 made logits
    # infinite, softmax NaN, and the draw an index past the vocabulary (a 424) or the logprob NaN
    logits = random_logits(2)
    out = Sampler(V, "cpu")(logits, [make_row(seed=1, do_sample=True, temperature=1e-320),
                                     make_row(seed=2, do_sample=True, temperature=1e-30)])
    assert out.token_ids == logits.argmax(-1).tolist()
    previous = int(logits[0].argmax())
    for do_sample in (False, True):
        for penalty in (1e-300, 1e300):
            row = make_row(seed=3, prompt=[previous], do_sample=do_sample, repetition_penalty=penalty, top_n_tokens=3)
            out = Sampler(V, "cpu")(logits[:1], [row])
            assert 0 <= out.token_ids[0] < V and math.isfinite(out.logprobs[0]), (do_sample, penalty, out)
            assert all(math.isfinite(v) for v in out.top_logprobs[0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = log_probs([0.5, 0.3, 0.15])
    assert set(sampled_tokens(logits, top_p=0.7).tolist()) == {0, 1}
    assert set(sampled_tokens(logits, top_p=0.45).tolist()) == {0}


def test_top_p_over_a_flat_distribution():
    # the nucleus is larger than the first top-k prefix the filter looks at
    logits = random_logits(1, width=5000, scale=0.1)[0]
    tokens = set(sampled_tokens(logits, top_p=0.5).tolist())
    sorted_probs, ids = logits.softmax(-1).sort(descending=True)
    nucleus = ids[: int((sorted_probs.cumsum(0) < 0.5).sum()) + 1]
    assert len(nucleus) > 1000 and tokens <= set(nucleus.tolist()) and len(tokens) > 500


def test_typical_p_can_drop_the_most_likely_token():
    # 0.4 on token 0 and 0.02 on 30 others: the others' surprisal is closer to the entropy
    logits = torch.full((V,), -math.inf)
    logits[0], logits[1:31] = math.log(0.4), math.log(0.02)
    tokens = set(sampled_tokens(logits, typical_p=0.5).tolist())
    assert 0 not in tokens and tokens <= set(range(1, 31))
    assert 0 in set(sampled_tokens(logits).tolist())


def test_min_p_is_relative_to_the_most_likely():
    logits = log_probs([0.5, 0.3, 0.1])
    assert set(sampled_tokens(logits, min_p=0.25).tolist()) == {0, 1}
    assert set(sampled_tokens(logits, min_p=0.19).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "name, value, warper",
    [
        ("top_k", 20, "TopKLogitsWarper"),
        ("top_p", 0.8, "TopPLogitsWarper"),
        ("typical_p", 0.6, "TypicalLogitsWarper"),
        ("min_p", 0.05, "MinPLogitsWarper"),
    ],
)
def test_filters_keep_what_transformers_keeps(name, value, warper):
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(6, width=500, scale=2.0)
    expected = getattr(warpers, warper)(value)(None, logits.clone())
    column = torch.full((6, 1), value if name != "min_p" else math.log(value))
    removed = getattr(filters, name)(logits, column.long() if name == "top_k" else column)
    assert torch.equal(~removed, expected > -math.inf)


def test_sampler_applies_temperature_then_top_k_then_top_p_like_transformers():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(1, width=500, scale=2.0)
    expected = logits.clone()
    for warper in (
        warpers.TemperatureLogitsWarper(0.7),
        warpers.TopKLogitsWarper(50),
        warpers.TopPLogitsWarper(0.9),
    ):
        expected = warper(None, expected)
    tokens = sampled_tokens(logits[0], n=3000, temperature=0.7, top_k=50, top_p=0.9)
    assert set(tokens.tolist()) == set(torch.nonzero(expected[0] > -math.inf)[:, 0].tolist())


# --- logit processors (checked on the reported distribution) ---------------------------------


def test_repetition_penalty_covers_prompt_and_output():
    logits = random_logits(1)[0]
    row = make_row(prompt=[1, 2, 3], output=[4, 4], repetition_penalty=1.7)
    expected = logits.clone()
    for i in (1, 2, 3, 4):
        expected[i] = expected[i] / 1.7 if expected[i] > 0 else expected[i] * 1.7
    assert torch.equal(processed_logprobs(logits, row), expected.log_softmax(-1))


def test_repetition_penalty_changes_the_greedy_choice_through_a_prompt_token():
    logits = torch.zeros(V)
    logits[3], logits[4] = 2.0, 1.5
    out = Sampler(V, "cpu")(logits[None], [make_row(prompt=[3], repetition_penalty=2.0)])
    assert out.token_ids == [4]


def test_frequency_penalty_counts_output_occurrences_only():
    logits = random_logits(1)[0]
    row = make_row(prompt=[7, 7], output=[5, 5, 5, 6], frequency_penalty=0.5)
    expected = logits.clone()
    expected[5] -= 1.5
    expected[6] -= 0.5
    assert torch.equal(processed_logprobs(logits, row), expected.log_softmax(-1))


def test_presence_penalty_applies_once():
    logits = random_logits(1)[0]
    row = make_row(prompt=[7], output=[5, 5, 5, 6], presence_penalty=0.8, frequency_penalty=0.1)
    expected = logits.clone()
    expected[5] -= 0.1 * 3 + 0.8
    expected[6] -= 0.1 * 1 + 0.8
    assert torch.allclose(processed_logprobs(logits, row), expected.log_softmax(-1))


def test_logit_bias():
    logits = random_logits(1)[0]
    low, top = int(logits.argmin()), int(logits.argmax())
    row = make_row(logit_bias={low: 100.0, top: -100.0})
    assert Sampler(V, "cpu")(logits[None], [row]).token_ids == [low]
    expected = logits.clone()
    expected[low] += 100.0
    expected[top] -= 100.0
    assert torch.equal(
        processed_logprobs(logits, make_row(logit_bias={low: 100.0, top: -100.0})),
        expected.log_softmax(-1),
    )


def test_suppressed_ids_are_banned():
    logits = random_logits(2)
    top = logits.argmax(-1).tolist()
    rows = [
        make_row(suppressed=[top[0]]),
        make_row(seed=1, do_sample=True, temperature=0.01, suppressed=[top[1]]),
    ]
    out = Sampler(V, "cpu")(logits, rows)
    assert out.token_ids[0] != top[0] and out.token_ids[1] != top[1]
    assert processed_logprobs(logits[0], make_row(suppressed=[top[0]]))[top[0]] == -math.inf


def test_grammar_mask_applies_to_greedy_and_sampled_rows():
    logits = random_logits(2)
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[:, [2, 9]] = True
    for seed in range(20):
        rows = [make_row(), make_row(seed=seed, do_sample=True, temperature=5.0)]
        out = Sampler(V, "cpu")(logits, rows, allowed)
        assert set(out.token_ids) <= {2, 9}
    dense = processed_logprobs(logits[0], make_row(), allowed[:1])
    assert torch.isfinite(dense).nonzero()[:, 0].tolist() == [2, 9]


def test_watermark_adds_delta_to_a_deterministic_green_list():
    sampler = Sampler(V, "cpu", watermark_gamma=0.25, watermark_delta=2.0)
    logits = random_logits(1)[0]
    green = sampler.greenlist(11)
    assert len(green) == 16 and torch.equal(green, sampler.greenlist(11))
    assert not torch.equal(green.sort().values, sampler.greenlist(12).sort().values)
    expected = logits.clone()
    expected[green] += 2.0
    # the previous token is the last output id, or the last prompt id before any output
    for row in (make_row(output=[3, 11], watermark=True), make_row(prompt=[4, 11], watermark=True)):
        row.params.top_n_tokens = V
        out = sampler(logits[None], [row])
        dense = torch.empty(V)
        dense[torch.tensor(out.top_ids[0])] = torch.tensor(out.top_logprobs[0])
        assert torch.equal(dense, expected.log_softmax(-1))


def test_watermark_is_detectable():
    width, gamma, steps = 1000, 0.5, 200
    sampler = Sampler(width, "cpu", watermark_gamma=gamma, watermark_delta=2.0)

    def green_fraction(watermark: bool) -> float:
        row = make_row(seed=3, prompt=[1], do_sample=True, watermark=watermark)
        hits = 0
        for step in range(steps):
            previous = (row.output_ids or row.prompt_ids)[-1]
            token = sampler(random_logits(1, width, seed=step, scale=1.0), [row]).token_ids[0]
            hits += token in set(sampler.greenlist(previous).tolist())
            row.output_ids.append(token)
        return hits / steps

    z = lambda fraction: (fraction - gamma) * math.sqrt(steps) / math.sqrt(gamma * (1 - gamma))
    assert z(green_fraction(True)) > 4
    assert abs(z(green_fraction(False))) < 4


# --- batches and seeds -----------------------------------------------------------------------


def neighbours(width: int) -> list[SamplingRow]:
    """Seven rows with assorted parameters to share a batch with the row under test."""
    return [
        make_row(),
        make_row(seed=7, do_sample=True, temperature=1.3, top_p=0.5),
        make_row(output=[1, 1, 2], repetition_penalty=1.2, frequency_penalty=0.3, top_n_tokens=3),
        make_row(seed=8, do_sample=True, typical_p=0.7, top_n_tokens=5),
        make_row(seed=9, do_sample=True, min_p=0.1, top_k=width),
        make_row(watermark=True, logit_bias={0: 5.0}, suppressed=[1]),
        make_row(seed=10, do_sample=True, top_k=3, presence_penalty=0.5, output=[4]),
    ]


def generate(row: SamplingRow, position: int, steps: int, width: int, with_others: bool):
    """Run `row` for `steps` steps at `position` among the neighbours (or alone); its outputs."""
    sampler = Sampler(width, "cpu")
    others = neighbours(width) if with_others else []
    outputs = []
    for step in range(steps):
        rows = others[:position] + [row] + others[position:]
        logits = random_logits(len(rows), width, seed=1000 + step)
        logits[position] = random_logits(1, width, seed=step)[0]  # the row's own logits
        out = sampler(logits, rows)
        outputs.append(
            (
                out.token_ids[position],
                out.logprobs[position],
                out.top_ids[position],
                out.top_logprobs[position],
            )
        )
        row.output_ids.append(out.token_ids[position])
    return outputs


def test_same_seed_gives_the_same_tokens_alone_or_in_any_batch_position():
    params = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9}
    params |= {"repetition_penalty": 1.1, "top_n_tokens": 2}
    width = 500
    alone = generate(make_row(seed=1234, **params), 0, 50, width, with_others=False)
    for position in (0, 3, 7):
        assert (
            generate(make_row(seed=1234, **params), position, 50, width, with_others=True) == alone
        )
    other_seed = generate(make_row(seed=4321, **params), 0, 50, width, with_others=False)
    assert [t[0] for t in other_seed] != [t[0] for t in alone]


def mixed_rows(width: int) -> list[SamplingRow]:
    extra = make_row(seed=11, do_sample=True, temperature=0.5, top_n_tokens=4, suppressed=[0, 1])
    return neighbours(width) + [extra]


def assert_rows_equal_alone(logits: torch.Tensor, allowed: torch.Tensor | None = None):
    width = logits.shape[-1]
    batched = Sampler(width, "cpu")(logits, mixed_rows(width), allowed)
    for i, row in enumerate(mixed_rows(width)):
        mask = None if allowed is None else allowed[i : i + 1]
        alone = Sampler(width, "cpu")(logits[i : i + 1].clone(), [row], mask)
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.logprobs[0] == batched.logprobs[i]
        assert alone.top_ids[0] == batched.top_ids[i]
        assert alone.top_logprobs[0] == batched.top_logprobs[i]


def test_each_row_of_a_mixed_batch_equals_the_row_alone():
    logits = random_logits(8)
    allowed = torch.rand(8, V, generator=torch.Generator().manual_seed(5)) > 0.3
    assert_rows_equal_alone(logits, allowed)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # reductions over long rows split across threads only with > 1
    yield
    torch.set_num_threads(threads)


def test_full_vocabulary_batch_invariance(two_threads):
    logits = random_logits(8, 49152, scale=4.0).bfloat16().float()  # bf16 logits: many ties
    assert_rows_equal_alone(logits)


def test_the_draw_over_the_tokens_left_is_the_draw_over_the_whole_vocabulary():
    """inverse_cdf sums only the tokens a filter left when they are few: the same token for every u
    as the running sum over the whole row (the other branch, taken when many are left)."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 4096, generator=generator)
    probs[probs < 0.995] = 0  # ~20 tokens left a row, at scattered ids
    probs[3] = 0
    probs[3, [0, 4095]] = 0.5  # the first and the last id
    probs = probs / probs.sum(-1, keepdim=True)
    assert int((probs > 0).sum(-1).max()) * 4 < probs.shape[1]  # the compact branch
    wide = torch.cat([probs, torch.full((6, 20000), 0.0)], dim=1)
    wide[:, 4096:] = 1e-30  # every token left (the whole-row branch), adding nothing to the float64 sums
    for _ in range(200):
        u = torch.rand(6, generator=generator, dtype=torch.float64)
        chosen = inverse_cdf(probs, u)
        assert (probs.gather(1, chosen[:, None]) > 0).all()
        cdf = probs.double().cumsum(-1)
        expected = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)  # the first id whose running sum passes u
        assert torch.equal(chosen, expected)
        assert torch.equal(inverse_cdf(wide, u), chosen)
    for row in (0, 3):  # the end points of the CDF pick the first and the last token left
        assert int(inverse_cdf(probs[row : row + 1], torch.zeros(1, dtype=torch.float64))) == int(probs[row].nonzero()[0])
