"""The server: one page (`static/`) and a JSON API over `instruments`, for one loaded run.

    GET  /                 the page
    GET  /api/run          config, parameters, tokenizer, loss curves
    GET  /api/count        parameters, FLOPs, memory
    POST /api/score        {"text", "temperature", "top_k"}
    POST /api/generate     {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
    POST /api/attention    {"prompt", "layer"}
    POST /api/trace        {"prompt"}
    POST /api/locate       {"prompt", "subject", "target", "noise", "samples", "seed"}

Bad input (an unknown field, a wrong type, a prompt beyond the context, malformed JSON) is
answered 400 with {"error": "<one line>"}; the page shows that line. One lock serialises the
model: requests run one at a time, as the commands do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from llmlab.errors import UserError
from llmlab.run_dir import Run
from llmlab.web import instruments

STATIC = Path(__file__).parent / "static"
MAX_NEW_TOKENS = 1000  # a request that would hold the model for minutes is refused


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    @model_validator(mode="after")
    def _utf8(self) -> Body:
        """JSON can carry a lone surrogate ("\\ud800"), which is no text: refuse it by name."""
        for name, value in self:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{name} is not valid UTF-8") from None
        return self


class ScoreRequest(Body):
    text: str
    temperature: float = 1.0
    top_k: int = Field(5, ge=0, le=50)


class GenerateRequest(Body):
    prompt: str
    max_new_tokens: int = Field(100, ge=0, le=MAX_NEW_TOKENS)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 1337


class AttentionRequest(Body):
    prompt: str
    layer: int = 0


class TraceRequest(Body):
    prompt: str


class LocateRequest(Body):
    prompt: str
    subject: str
    target: str
    noise: float = 3.0
    samples: int = 10
    seed: int = 0


def create_app(run: Run) -> FastAPI:
    """The app for one run; the model stays loaded for the life of the server."""
    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None)  # the docs pages would fetch from a CDN
    lock = threading.Lock()

    def locked(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
        with lock:
            return fn(run, *args, **kwargs)

    @app.exception_handler(UserError)
    def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(e.errors())}, status_code=400)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, and a body that is not UTF-8
        unreadable = e.status_code == 400 and "parsing the body" in str(e.detail)
        message = "the request body is not valid JSON in UTF-8" if unreadable else str(e.detail)
        return JSONResponse({"error": message}, status_code=e.status_code)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/run")
    def run_info() -> dict[str, Any]:
        return locked(instruments.run_info)

    count_cache: dict[str, Any] = {}  # the report depends on the config alone

    @app.get("/api/count")
    def count() -> dict[str, Any]:
        if not count_cache:
            count_cache.update(locked(instruments.count))
        return count_cache

    @app.post("/api/score")
    def score(r: ScoreRequest) -> dict[str, Any]:
        return locked(instruments.score, r.text, r.temperature, r.top_k)

    @app.post("/api/generate")
    def generate(r: GenerateRequest) -> dict[str, Any]:
        return locked(instruments.generate, r.prompt, r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.seed)

    @app.post("/api/attention")
    def attention(r: AttentionRequest) -> dict[str, Any]:
        return locked(instruments.attention, r.prompt, r.layer)

    @app.post("/api/trace")
    def trace(r: TraceRequest) -> dict[str, Any]:
        return locked(instruments.trace, r.prompt)

    @app.post("/api/locate")
    def locate(r: LocateRequest) -> dict[str, Any]:
        return locked(instruments.locate, r.prompt, r.subject, r.target, r.noise, r.samples, r.seed)

    return app


def validation_message(errors: Any) -> str:
    """pydantic's first complaint as one line: "temperature: Input should be a valid number"."""
    first = next(iter(errors), {"loc": (), "msg": "invalid request"})
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"{where}: {message}" if where else message
