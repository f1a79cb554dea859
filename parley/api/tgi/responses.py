"""Engine events -> TGI's response shapes (GenerateResponse, StreamResponse)."""

from __future__ import annotations

from typing import AsyncIterator

from parley.api.tgi.schemas import GenerateParameters
from parley.types import FinalEvent, Token, TokenEvent


def token_json(t: Token) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def prefill_json(t: Token) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob}


def mean_logprob(final: FinalEvent) -> float:
    logprobs = [t.logprob for t in final.tokens if t.logprob is not None]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def _sequence(final: FinalEvent, prefix: str, prefill: list[Token], p: GenerateParameters) -> dict:
    """A BestOfSequence; Details is the same plus best_of_sequences."""
    seq = {
        "generated_text": prefix + final.text,
        "finish_reason": final.finish_reason.value,
        "generated_tokens": final.generated_tokens,
        "seed": final.seed,
        "prefill": [prefill_json(t) for t in prefill],
        "tokens": [token_json(t) for t in final.tokens],
    }
    if p.top_n_tokens:
        seq["top_tokens"] = [[token_json(t) for t in top] for top in final.top_tokens]
    return seq


def generate_response(finals: list[FinalEvent], inputs: str, p: GenerateParameters) -> dict:
    """With best_of > 1 the answer is the sequence of highest mean token logprob; the others are
    reported in details.best_of_sequences."""
    prefix = inputs if p.return_full_text else ""
    best = max(finals, key=mean_logprob)
    response = {"generated_text": prefix + best.text}
    if p.details:
        prefill = next((f.prefill for f in finals if f.prefill), [])  # the engine reports it once
        details = _sequence(best, prefix, prefill, p)
        del details["generated_text"]
        if len(finals) > 1:
            details["best_of_sequences"] = [_sequence(f, prefix, prefill, p) for f in finals if f is not best]
        response["details"] = details
    return response


async def stream_payloads(batches: AsyncIterator[list[tuple[int, TokenEvent | FinalEvent]]], inputs: str,
                          p: GenerateParameters) -> AsyncIterator[list[dict]]:
    """One StreamResponse per token; the last token's also carries generated_text and details.

    The engine sends a sequence's last TokenEvent and its FinalEvent in the same batch, so a
    TokenEvent is held back only until the end of its batch to learn whether it was the last."""
    prefix = inputs if p.return_full_text else ""
    count = 0  # TGI numbers stream events from 1

    def payload(event: TokenEvent, final: FinalEvent | None = None) -> dict:
        nonlocal count
        count += 1
        out = {"index": count, "token": token_json(event.token), "generated_text": None, "details": None}
        if p.top_n_tokens:
            out["top_tokens"] = [token_json(t) for t in event.top_tokens]
        if final is not None:
            out["generated_text"] = prefix + final.text
            if p.details:
                out["details"] = {"finish_reason": final.finish_reason.value,
                                  "generated_tokens": final.generated_tokens, "seed": final.seed,
                                  "input_length": final.prompt_tokens}
        return out

    async for batch in batches:
        out, held = [], {}
        for _, event in batch:
            if isinstance(event, TokenEvent):
                if event.index in held:
                    out.append(payload(held.pop(event.index)))
                held[event.index] = event
            else:
                last = held.pop(event.index, None)
                if last is None:  # not expected from the engine: repeat the last token rather than invent one
                    last = TokenEvent(event.index, event.tokens[-1] if event.tokens else Token(0, "", None, True), "")
                out.append(payload(last, event))
        out.extend(payload(e) for e in held.values())
        yield out
