"""A thinking model's output split into reasoning and answer, whole and streamed, and where a
rendered prompt leaves the model."""

import random

import pytest

from parley.tokenization.reasoning import ANSWER, MAYBE, THINKING, ReasoningSplitter, prompt_phase, split_reasoning


@pytest.mark.parametrize("prompt, phase", [
    ("<|im_start|>assistant\n<think>\n", THINKING),  # DeepSeek-R1: the template opens the thinking
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", ANSWER),  # Qwen3, enable_thinking false
    ("<|im_start|>assistant\n", MAYBE),  # Qwen3 by default: the model may open one
    ("<think>old</think>answer<|im_end|>\n<|im_start|>assistant\n", MAYBE),  # an earlier turn's thinking
])
def test_prompt_phase(prompt, phase):
    assert prompt_phase(prompt) == phase


@pytest.mark.parametrize("text, phase, expected", [
    ("\nstep one\nstep two\n</think>\n\nThe answer.", THINKING, ("step one\nstep two", "The answer.")),
    ("<think>\nhmm\n</think>\n\nYes.", MAYBE, ("hmm", "Yes.")),
    ("  <think>hmm</think>Yes.", MAYBE, ("hmm", "Yes.")),
    ("No thinking here.", MAYBE, (None, "No thinking here.")),
    ("<thinking is a word", MAYBE, (None, "<thinking is a word")),
    ("\n\nJust the answer <think> as text", ANSWER, (None, "Just the answer <think> as text")),
    ("cut off while thinking\n", THINKING, ("cut off while thinking", "")),
    ("\n</think>\n\nempty thought", THINKING, (None, "empty thought")),
    ("a</think>b</think>c", THINKING, ("a", "b</think>c")),  # one thinking only
])
def test_split_reasoning(text, phase, expected):
    assert split_reasoning(text, phase) == expected


@pytest.mark.parametrize("phase", [THINKING, MAYBE, ANSWER])
@pytest.mark.parametrize("text", [
    "\nfirst, think </thi then more\n\n</think>\n\nanswer with </think> inside\n",
    "<think> a\n \n</think>b",
    "<thin",
    "  \n",
])
def test_any_streaming_of_the_text_joins_to_the_whole_split(text, phase):
    whole = split_reasoning(text, phase)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        splitter, pieces = ReasoningSplitter(phase), []
        for delta in deltas:
            pieces += splitter.feed(delta)
        pieces += splitter.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning") or None
        content = "".join(t for kind, t in pieces if kind == "content")
        assert (reasoning, content) == whole, deltas
        assert all(t for _, t in pieces), "no empty pieces"


def test_reasoning_streams_before_its_end_is_known():
    splitter = ReasoningSplitter(THINKING)
    assert splitter.feed("\nLet me") == [("reasoning", "Let me")]
    assert splitter.feed(" see.\n") == [("reasoning", " see.")]  # the newline waits: the marker may follow
    assert splitter.feed("</th") == []
    assert splitter.feed("ink>\n\nOK") == [("content", "OK")]
