"""What the API reads and writes: request and response models, errors, and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

RETRY_AFTER_S = "1"
SHOWN_CHARS = 80  # most characters of a client's key or of a parser's message quoted in an error


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class Result(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    results: list[Result]


class WordContribution(BaseModel):
    word: str
    start: int  # character offsets of the word in its text: text[start:end] == word
    end: int
    contribution: float  # above 0 it speaks for the label, below 0 against it


class ExplainResult(Result):
    explanation: list[WordContribution]


class ExplainResponse(BaseModel):
    results: list[ExplainResult]


class ErrorBody(BaseModel):
    error: str


class ApiError(Exception):
    """An answer other than 200, with its one-line message."""

    def __init__(self, status: int, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(content, ensure_ascii=False), status, headers, media_type="application/json")


def error_response(
    status: int, message: str, retry: bool = False, headers: Mapping[str, str] | None = None
) -> Response:
    headers = {**(headers or {}), **({"Retry-After": RETRY_AFTER_S} if retry else {})}
    return json_response({"error": message}, status, headers)


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text`, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_texts(body: bytes) -> list[str]:
    """The texts of a classify or explain body; 400 when it is not JSON, 422 when it is not {"texts": [str, ...]}.

    The body is read as JSON whatever its Content-Type says: `curl -d` sends form-encoded.
    """
    try:
        return ClassifyRequest.model_validate_json(body).texts
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] != "json_invalid":
            raise _not_texts(first) from None
        why = shorten(str(first.get("ctx", {}).get("error", first["msg"])))
    try:  # Python's parser also takes what JSON allows and pydantic's refuses: an escaped lone surrogate ("\ud800")
        value = json.loads(body, parse_int=float)  # and integers of any length: int() refuses 4,300 digits and more
    except (ValueError, RecursionError):
        raise ApiError(400, f"the body is not valid JSON ({why})") from None
    try:
        return ClassifyRequest.model_validate(value).texts  # the Predictor makes each lone surrogate a U+FFFD
    except ValidationError as err:
        raise _not_texts(err.errors()[0]) from None


def _not_texts(first: Mapping) -> ApiError:
    # Pieces are shortened: an unknown key is the client's own, and may be a megabyte long.
    where = ".".join(shorten(str(part)) for part in first["loc"]) or "body"
    return ApiError(422, f'{where}: {shorten(first["msg"])}; send {{"texts": ["...", ...]}}')


ERRORS = {
    400: "The body is not valid JSON.",
    408: "The body did not all arrive within the server's timeout.",
    413: "The body, the number of texts or a text's length is over its limit.",
    422: 'The body is not {"texts": [string, ...]}.',
    503: "The queue is full, or the server is warming up or shutting down: retry after Retry-After seconds. "
         "Without Retry-After: the model failed its warm-up, and retrying will not help.",
    504: "The request was not answered within the server's timeout; its texts left the queue.",
}


def openapi(title: str, version: str, description: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, its schemas taken from the pydantic models above."""
    _, schemas = models_json_schema(
        [(ClassifyRequest, "validation"), (ClassifyResponse, "serialization"), (ExplainResponse, "serialization"),
         (ErrorBody, "serialization")],
        ref_template="#/components/schemas/{model}",
    )

    def body(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    def texts_in(summary: str, answer: str, response: str) -> dict[str, Any]:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, **body("ClassifyRequest")},
            "responses": {
                "200": {"description": answer, **body(response)},
                **{str(code): {"description": text, **body("ErrorBody")} for code, text in ERRORS.items()},
            },
        }}

    def status(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": {
            "/v1/classify": texts_in(
                "Classify texts; results come in the order of `texts`.", "One result per text.", "ClassifyResponse"),
            "/v1/explain": texts_in(
                "Classify texts and say how much each word pushed toward the label; results in the order of `texts`.",
                "One result per text, with the contribution of each of its words.", "ExplainResponse"),
            "/": {"get": {
                "summary": "A page to try the model in a browser.",
                "responses": {"200": {"description": "HTML.", "content": {"text/html": {}}}},
            }},
            "/healthz": {"get": {"summary": "The process is up.", "responses": {"200": status("Alive.")}}},
            "/readyz": {"get": {
                "summary": "The bundle is loaded and a warm-up batch has run.",
                "responses": {"200": status("Ready for traffic."), "503": {"description": ERRORS[503], **body("ErrorBody")}},
            }},
            "/metrics": {"get": {
                "summary": "Metrics in the Prometheus text format.",
                "responses": {"200": {"description": "Prometheus text.", "content": {"text/plain": {}}}},
            }},
        },
        "components": {"schemas": schemas["$defs"]},
    }
