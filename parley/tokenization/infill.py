"""Models that fill in the middle: given the text before a gap (the prompt) and after it (the
suffix), they write what goes between.

A model does when its vocabulary holds one of the spellings below as single tokens, the markers it
was trained with: prefix marker, prefix, suffix marker, suffix, middle marker, then the model writes
the middle (the "PSM" order of Bavarian et al., 2022, which these families use). It ends the middle
with its end-of-sequence token or, trained on whole repositories, with a marker that starts
something else (another file, padding, a new gap): `ENDS` and the markers themselves, where the
vocabulary has them, end it too, as llama.cpp's infill counts them as end-of-generation tokens.

Not here: CodeLlama's and Codestral's markers, whose prompts depend on how their sentencepiece
tokenizers space the text around the markers (vLLM has no fill-in-the-middle either; llama.cpp's
`/infill` and Ollama's `suffix` do).
"""

from __future__ import annotations

from parley.types import Infill

SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder 1 and 2, SantaCoder, Granite Code
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)
ENDS = ("<|fim_pad|>", "<fim_pad>", "<|file_sep|>", "<file_sep>", "<|file_separator|>", "<|repo_name|>",
        "<reponame>", "<|endoftext|>")


def find_infill(tokenizer) -> Infill | None:
    """The model's fill-in-the-middle markers (the first spelling its vocabulary holds whole), or None."""
    vocabulary = tokenizer.backend.token_to_id
    for markers in SPELLINGS:
        ids = [vocabulary(marker) for marker in markers]
        if None not in ids:
            ends = [i for i in (vocabulary(end) for end in ENDS) if i is not None]
            return Infill(*markers, *ids, end_ids=tuple(sorted(set(ends + ids))))
    return None
