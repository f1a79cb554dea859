"""TGI GenerateParameters -> GenerationRequest: the whole mapping, in one place."""

from __future__ import annotations

import json

from parley.api.budget import room_for_output
from parley.api.errors import require
from parley.api.tgi.schemas import GenerateParameters, GenerateRequest, GrammarType
from parley.types import Engine, GenerationRequest, Grammar, SamplingParams, StoppingCriteria


async def generation_request(body: GenerateRequest, engine: Engine, *, stream: bool) -> GenerationRequest:
    """The request with `inputs` tokenized (once: the engine takes the ids)."""
    p = body.params
    best_of = p.best_of or 1
    # TGI: setting any warper means sampling, with or without do_sample
    sampling = bool(p.do_sample) or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    _check_tgi_rules(p, best_of, sampling, stream, engine.info.max_best_of)
    grammar = _grammar(p.grammar)

    prompt = await engine.tokenize(body.inputs, add_special_tokens=True)
    max_new_tokens = p.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = room_for_output(engine.info, len(prompt), p.truncate)
    return GenerationRequest(
        prompt=prompt,
        sampling=SamplingParams(
            do_sample=sampling,
            temperature=p.temperature or 1.0,
            top_k=p.top_k or 0,
            top_p=p.top_p or 1.0,
            typical_p=p.typical_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            watermark=bool(p.watermark),
            top_n_tokens=p.top_n_tokens or 0,
        ),
        stopping=StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=p.stop or []),
        n=best_of,
        seeds=p.seed,
        truncate=p.truncate,
        decoder_input_details=bool(p.decoder_input_details),
        grammar=grammar,
        adapter_id=p.adapter_id,
    )


def _check_tgi_rules(p: GenerateParameters, best_of: int, sampling: bool, stream: bool, max_best_of: int) -> None:
    """TGI's own rules; `max_best_of` is TGI's flag, within the engine's limit on `n`."""
    require(best_of <= max_best_of, f"Input validation error: `best_of` must be <= {max_best_of}. Given: {best_of}",
            "best_of")
    if best_of > 1:
        require(not stream, "Input validation error: `best_of` > 1 is not supported when streaming tokens",
                "best_of")
        require(p.seed is None, "Input validation error: `seed` must not be set when `best_of` > 1", "seed")
        require(sampling, "Input validation error: `best_of` > 1 needs sampling (`do_sample` or a sampling "
                "parameter)", "best_of")
    require(not (stream and p.decoder_input_details),
            "Input validation error: `decoder_input_details` == true is not supported when streaming tokens",
            "decoder_input_details")


def _grammar(grammar: GrammarType | None) -> Grammar | None:
    if grammar is None:
        return None
    value = grammar.value
    if grammar.type == "regex":
        require(isinstance(value, str), "Input validation error: a regex grammar's `value` must be a string",
                "grammar")
        return Grammar("regex", value)
    return Grammar("json", value if isinstance(value, str) else json.dumps(value))
