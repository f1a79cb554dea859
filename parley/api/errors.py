"""Every failure the HTTP layer answers, as one `ApiError`, written in the caller's dialect.

Each route answers in the form of the dialect bound to it when it was registered
(dialects.speaking): TGI-native routes `{"error": "...", "error_type": "..."}`; OpenAI-style routes
`{"error": {"message", "type", "param", "code"}, "error_type": "..."}`: the object feeds the
OpenAI/Azure mappers, the top-level `error_type` the TGI ones (huggingface_hub, text-generation); a
422 adds FastAPI's `detail` list for mistralai; Anthropic's routes its own shape, and 400 for 422.
See SDK-WIRE §1.7. What no route has matched yet (a 404, the auth middleware, the Ray ingress)
takes its form from the path (`form_for_path`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from parley.api.jsonio import JSONBody
from parley.types import (GenerationError, NotFoundError, OverloadedError, ParleyError, RequestTimeoutError,
                          ValidationError)

log = logging.getLogger("parley.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after  # seconds, for a 429's Retry-After


class ClientDisconnected(ApiError):
    """The client went away; nobody reads the answer (499, nginx's code for it)."""

    def __init__(self):
        super().__init__(499, "Client closed the request", "cancelled")


def validation_error(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, "validation", param)


def require(condition: bool, message: str, param: str) -> None:
    """A request rule checked in the HTTP layer (dialect rules the engine cannot know)."""
    if not condition:
        raise validation_error(message, param)


@contextmanager
def fields_named(names: dict[str, str]) -> Iterator[None]:
    """Engine complaints about its own field names (`max_new_tokens`, `prompt`, `grammar`...)
    reported in the client's: `names` (dialects.engine_names) maps an engine field to the field the
    client sent. Every complaint's message is renamed, whichever field it is about (a
    `min_new_tokens` rule names `max_new_tokens` too)."""
    try:
        yield
    except ValidationError as exc:
        message = str(exc)
        for engine_name, wire_name in names.items():
            message = message.replace(f"`{engine_name}`", f"`{wire_name}`")
        raise validation_error(message, names.get(exc.field, exc.field)) from exc


def unknown_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """The fields of `body` (and of the models inside it) that no schema field declares, given a
    value: null counts as not given, as some SDKs send every field they know, nulls included."""
    names = [prefix + name for name, value in (body.model_extra or {}).items() if value is not None]
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if _keeps_unknown(item):
                names += unknown_fields(item, f"{prefix}{name}." if i is None else f"{prefix}{name}.{i}.")
    return names


def _keeps_unknown(value) -> bool:
    """A model that keeps unknown fields only to have them refused (not one that passes them on)."""
    return isinstance(value, BaseModel) and value.model_config.get("extra") == "allow" \
        and not getattr(value, "passes_extras", False)


def refuse_unknown_fields(body: BaseModel, status: int, enforce: bool) -> None:
    """Nothing is silently ignored: a field Parley does not know is refused, naming it as sent
    (OpenAI answers 400 "Unrecognized request argument supplied"; TGI's routes 422 as for every
    invalid input), unless the server runs with `--unknown-fields ignore` (`enforce` False)."""
    names = unknown_fields(body) if enforce else []
    if names:
        listed = ", ".join(f"`{name}`" for name in names)
        raise ApiError(status, f"Unrecognized request argument supplied: {listed} (a server started with "
                       "`--unknown-fields ignore` ignores them)", "invalid_request_error" if status == 400
                       else "validation", names[0])


_ENGINE_ERRORS: dict[type, tuple[int, str]] = {
    ValidationError: (422, "validation"),
    OverloadedError: (429, "overloaded"),
    RequestTimeoutError: (429, "timeout"),
    GenerationError: (424, "generation"),
    NotFoundError: (404, "not_found"),
}


def as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    for kind, (status, error_type) in _ENGINE_ERRORS.items():
        if isinstance(exc, kind):
            return ApiError(status, str(exc), error_type, getattr(exc, "field", None), getattr(exc, "retry_after", None))
    if isinstance(exc, ParleyError):
        return ApiError(424, str(exc), "generation")
    return ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}", "incomplete_generation")


# -- wire forms ---------------------------------------------------------------------------------
def tgi_body(err: ApiError) -> dict:
    return {"error": err.message, "error_type": err.error_type}


def openai_body(err: ApiError) -> dict:
    body = {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": err.error_type},
            "error_type": err.error_type}
    if err.status == 422:  # FastAPI's list, which mistralai parses into HTTPValidationError.data.detail
        loc = ["body", *err.param.split(".")] if err.param else ["body"]
        body["detail"] = [{"loc": loc, "msg": err.message, "type": err.error_type}]
    return body


ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error types by status (its API's errors page); what Parley answers 422 it answers 400
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def anthropic_body(err: ApiError) -> dict:
    kind = ANTHROPIC_ERROR_TYPES.get(400 if err.status == 422 else err.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}, "error_type": err.error_type}


@dataclass(frozen=True)
class ErrorForm:
    """How a dialect writes an error: its body, and the status of a request that breaks a rule."""

    body: Callable[[ApiError], dict]
    invalid_status: int = 422

    def response(self, err: ApiError, headers: dict | None = None) -> JSONBody:
        if err.status == 429:  # every 429 says when to come back; 1 s where nothing better is known
            headers = {**(headers or {}), "Retry-After": str(err.retry_after or 1)}
        status = self.invalid_status if err.status == 422 else err.status
        return JSONBody(self.body(err), status_code=status, headers=headers)


TGI_ERRORS, OPENAI_ERRORS, ANTHROPIC_ERRORS = ErrorForm(tgi_body), ErrorForm(openai_body), ErrorForm(anthropic_body, 400)


def form_for_path(path: str) -> ErrorForm:
    """The error form of a request no route has matched (yet): by its path."""
    if path.startswith(ANTHROPIC_PREFIX):
        return ANTHROPIC_ERRORS
    return OPENAI_ERRORS if path.startswith("/v1/") or path.endswith("/completions") else TGI_ERRORS


def error_form(request: Request) -> ErrorForm:
    """The error form of the dialect the matched route speaks (dialects.speaking)."""
    dialect = getattr(request.scope.get("route"), "dialect", None)
    return dialect.errors if dialect is not None else form_for_path(request.url.path)


def error_body(path: str, err: ApiError) -> dict:
    return form_for_path(path).body(err)


def error_response(path: str, err: ApiError, headers: dict | None = None) -> JSONBody:
    return form_for_path(path).response(err, headers)


class ErrorResponse(BaseModel):
    """TGI's error body (OpenAI-style routes put an object with `message` under `error`)."""

    error: str | dict
    error_type: str


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in ((400, "Unrecognized request argument (see --unknown-fields)"),
                                (401, "Missing or wrong API key (with --api-key)"),
                                (404, "Unknown adapter"), (413, "Body longer than --payload-limit"),
                                (422, "Input validation error"), (424, "Generation error"),
                                (429, "Model is overloaded"), (500, "Incomplete generation"))
}


# -- request validation (pydantic) ---------------------------------------------------------------
# how pydantic names the member of a union that failed ("seed.constrained-int", "input.list[...]"): not a field
_UNION_MEMBER = re.compile(r"constrained-\w+|int|float|str|bool|none|[\w-]+\[.*\]")


def _as_sent(body, loc: list) -> list:
    """`loc` as the client wrote the field: without the union members pydantic names in it (a
    tagged union's tag, `messages.0.content.0.text.foo` for `messages.0.content.0.foo`; a model's
    class name), found by walking the body the client sent."""
    path, value, tagged = [], body, False
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(value, dict) and not tagged and part == value.get("type") and not (last and part in value):
            tagged = True  # the tag of the object it is in, named once before the object's fields
        elif isinstance(value, dict) and part in value or isinstance(value, list) and isinstance(part, int) \
                and 0 <= part < len(value):
            path.append(part)
            value, tagged = value[part], False
        elif isinstance(value, dict) and last and not _UNION_MEMBER.fullmatch(str(part)):
            path.append(part)  # a field missing from the object
    return path


def describe_validation(exc: RequestValidationError) -> ApiError:
    """One message naming each offending field, as the client sent it, and the rule it broke. Where
    a union's members fail at different depths (`content`: text or a list of parts), the deeper
    complaint is the one that says what is wrong: the others are left out."""
    failures = []  # (field, message)
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            failures.append((None, f"Malformed JSON body: {detail}".rstrip(": ")))
            continue
        if loc[:1] == ["body"] and exc.body is not None:
            loc = _as_sent(exc.body, loc[1:])
        else:
            loc = [str(p) for p in loc if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
        failures.append((".".join(map(str, loc)) or "body", error.get("msg", "invalid value")))
    fields = [field for field, _ in failures if field is not None]
    failures = [(field, message) for field, message in failures
                if field is None or not any(other.startswith(field + ".") for other in fields)]
    parts = [message if field is None else f"`{field}`: {message}" for field, message in failures]
    first_field = next((field for field, _ in failures if field is not None), None)
    return validation_error("Input validation error: " + "; ".join(parts), first_field)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request: Request, exc: RequestValidationError):
        return error_form(request).response(describe_validation(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        return error_form(request).response(ApiError(exc.status_code, message, error_type), exc.headers)

    @app.exception_handler(ApiError)
    @app.exception_handler(ParleyError)
    async def on_api_error(request: Request, exc: Exception):
        return error_form(request).response(as_api_error(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_form(request).response(as_api_error(exc))
