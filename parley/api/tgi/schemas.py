"""TGI's request bodies (tgi-openapi.json). Every optional field accepts null, as text-generation
sends every parameter, nulls included. Unknown fields are kept only to be refused by name (a 422,
errors.refuse_unknown_fields; null ones count as absent)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GrammarType(BaseModel):
    type: Literal["json", "regex"]
    value: Any = Field(description="json: a JSON Schema (object or text); regex: the pattern")


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    adapter_id: str | None = None
    best_of: int | None = Field(None, gt=0)
    decoder_input_details: bool | None = False
    details: bool | None = True
    do_sample: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: GrammarType | None = None
    # absent: 100 (TGI's default); explicit null: as many as max_total_tokens allows
    max_new_tokens: int | None = Field(100, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="a u64")
    stop: list[str] | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=0)
    typical_p: float | None = Field(None, gt=0, le=1)
    watermark: bool | None = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: str
    parameters: GenerateParameters | None = None

    @property
    def params(self) -> GenerateParameters:
        return self.parameters or GenerateParameters()


class CompatGenerateRequest(GenerateRequest):
    stream: bool | None = False
