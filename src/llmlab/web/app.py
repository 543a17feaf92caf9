"""The server: one page (`static/`) and a JSON API over `instruments`, for one loaded run.

    GET  /                 the page
    GET  /api/run          config, parameters, tokenizer, loss curves
    GET  /api/count        parameters, FLOPs, memory
    POST /api/score        {"text", "temperature", "top_k"}
    POST /api/generate     {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
    POST /api/generate/stream  the same, answered as JSON lines, one per new token, then {"done": …}
    POST /api/rejection    {"prompt", "proposal_temperature", "samples", "seed"}
    POST /api/attention    {"prompt", "layer"}
    POST /api/trace        {"prompt"}
    POST /api/locate       {"prompt", "subject", "target", "noise", "samples", "seed"}
    POST /api/neurons      {"prompt", "position", "top", "tokens"}
    POST /api/edit         {"prompt", "subject", "target", "method", "site", "new_tokens"}: edited, scored, undone

Bad input (an unknown field, a wrong type, a prompt beyond the context, malformed JSON) is
answered 400 with {"error": "<one line>"}; the page shows that line. Types are strict: "5" is not
an integer. A float that is inf or NaN (a perplexity beyond the largest float) is sent as null,
as `--json` prints it. One lock serialises the model: its computations run one at a time, as
the commands do; generating (streamed or not) takes the lock for each token, so other requests
run between its tokens, and a client that hangs up stops its generation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmlab.config import MAX_SEED
from llmlab.errors import UserError
from llmlab.run_dir import Run
from llmlab.strict_json import dumps
from llmlab.web import instruments

STATIC = Path(__file__).parent / "static"
# Requests that would hold the model for minutes are refused (the commands take them):
MAX_NEW_TOKENS = 1000
MAX_TEXT = 20_000  # characters; longer texts are for `llmlab score --file`
HANG_UP_POLL = 0.05  # seconds between looks at a plain /api/generate's connection


class FiniteJSONResponse(JSONResponse):
    """JSON without the non-standard Infinity and NaN: they become null."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt field is an error, "5" is no int

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        """JSON can carry a lone surrogate ("\\ud800"), which is no text: refuse it by name, first
        (a field name holding one is named with the surrogate escaped)."""
        for name, value in data.items() if isinstance(data, dict) else ():
            if not _is_utf8(name):
                raise ValueError(f"the field name {name!a} is not valid UTF-8")  # !a: escaped, one line
            if isinstance(value, str) and not _is_utf8(value):
                raise ValueError(f"{name} is not valid UTF-8")
        return data


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ScoreRequest(Body):
    text: str = Field(max_length=MAX_TEXT)
    temperature: float = 1.0
    top_k: int = Field(5, ge=0, le=50)


class GenerateRequest(Body):
    prompt: str
    max_new_tokens: int = Field(100, ge=0, le=MAX_NEW_TOKENS)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = Field(1337, ge=0, le=MAX_SEED)


class RejectionRequest(Body):
    prompt: str
    proposal_temperature: float = 2.0
    samples: int = Field(2000, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)


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
    samples: int = Field(10, ge=1, le=10)  # each sample is S × L forward passes of the fact
    seed: int = Field(0, ge=0, le=MAX_SEED)


class NeuronsRequest(Body):
    prompt: str
    position: int = -1
    top: int = Field(5, ge=1, le=50)
    tokens: int = Field(5, ge=1, le=50)


class EditRequest(Body):
    prompt: str
    subject: str
    target: str
    method: str = "rome"
    site: str = "subject"
    new_tokens: int = Field(20, ge=0, le=100)


def create_app(run: Run) -> FastAPI:
    """The app for one run; the model stays loaded for the life of the server."""
    # no /docs: FastAPI's documentation pages would fetch their scripts from a CDN
    app = FastAPI(title="llmlab", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False,
                  default_response_class=FiniteJSONResponse)  # fmt: skip
    lock = threading.Lock()

    def locked(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
        with lock:
            return fn(run, *args, **kwargs)

    add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:  # async: the page loads while the model's requests queue in threads
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
    async def generate(r: GenerateRequest, request: Request) -> dict[str, Any] | None:
        # Decoded a token at a time in a worker thread, taking the lock for each as the stream does,
        # while this coroutine watches the connection: a client that hangs up (a closed tab, a
        # script's timeout) stops the decoding within a token and HANG_UP_POLL seconds.
        hung_up = threading.Event()

        def decode() -> dict[str, Any] | None:
            lines = instruments.generate_stream(run, r.prompt, r.max_new_tokens, r.temperature, r.top_k,
                                                r.top_p, r.seed)  # fmt: skip
            while not hung_up.is_set():
                with lock:
                    line = next(lines)
                if "done" in line:
                    return line["done"]
            with lock:
                lines.close()  # leaves the model as it found it
            return None  # nobody is left to read an answer

        work = asyncio.ensure_future(run_in_threadpool(decode))
        while not work.done():
            await asyncio.wait({work}, timeout=HANG_UP_POLL)
            if not work.done() and await request.is_disconnected():
                hung_up.set()
        return work.result()

    @app.post("/api/generate/stream")
    def generate_stream(r: GenerateRequest) -> StreamingResponse:
        lines = instruments.generate_stream(run, r.prompt, r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.seed)

        def body() -> Iterator[str]:
            # The lock is held for each token's step, never across a yield: a reader that goes away
            # leaves this generator unfinished until the garbage collector finds it, and it must
            # not keep the model from the next request meanwhile. Other requests run between tokens.
            while True:
                with lock:
                    try:
                        line = next(lines)
                    except StopIteration:
                        return
                    except Exception as e:  # the 200 has gone out: the error is the last line, as the handlers word it
                        line = {"error": error_message(e)}
                yield dumps(line) + "\n"
                if "error" in line:
                    return

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/api/rejection")
    def rejection(r: RejectionRequest) -> dict[str, Any]:
        return locked(instruments.rejection, r.prompt, r.proposal_temperature, r.samples, r.seed)

    @app.post("/api/attention")
    def attention(r: AttentionRequest) -> dict[str, Any]:
        return locked(instruments.attention, r.prompt, r.layer)

    @app.post("/api/trace")
    def trace(r: TraceRequest) -> dict[str, Any]:
        return locked(instruments.trace, r.prompt)

    @app.post("/api/locate")
    def locate(r: LocateRequest) -> dict[str, Any]:
        return locked(instruments.locate, r.prompt, r.subject, r.target, r.noise, r.samples, r.seed)

    @app.post("/api/neurons")
    def neurons(r: NeuronsRequest) -> dict[str, Any]:
        return locked(instruments.neurons, r.prompt, r.position, r.top, r.tokens)

    edit_memo: dict[str, Any] = {}  # the key statistics C, estimated once per layer

    @app.post("/api/edit")
    def edit(r: EditRequest) -> dict[str, Any]:
        return locked(instruments.edit, r.prompt, r.subject, r.target, r.method, r.site, r.new_tokens, edit_memo)

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": "<one line>"}: bad input 400, unknown path 404, wrong method 405, a bug 500."""

    @app.exception_handler(UserError)
    def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"error": error_message(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()  # as FastAPI reads it
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            return JSONResponse({"error": "send the body as JSON, with content-type: application/json"}, 400)
        return JSONResponse({"error": validation_message(e.errors())}, status_code=400)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405, and unreadable bodies
        # FastAPI reports a body that json.loads cannot read (bad UTF-8, too deep, a 5000-digit
        # number) as HTTPException(400, "There was an error parsing the body"): matched by its text
        unreadable = e.status_code == 400 and "parsing the body" in str(e.detail)
        message = ("the request body could not be read as JSON (not UTF-8, nested too deeply, or a number of "
                   "thousands of digits)") if unreadable else str(e.detail)  # fmt: skip
        return JSONResponse({"error": message}, status_code=e.status_code, headers=e.headers)  # 405's Allow

    @app.exception_handler(Exception)
    def bug(request: Request, e: Exception) -> JSONResponse:  # still one line, for the page to show
        return JSONResponse({"error": error_message(e)}, 500)


def error_message(e: Exception) -> str:
    """One line: a UserError's message, or "internal error: <type>: <message>" for a bug."""
    text = " ".join(str(e).split())
    return text if isinstance(e, UserError) else f"internal error: {type(e).__name__}: {text}"


def validation_message(errors: Any) -> str:
    """pydantic's first complaint as one line: "temperature: Input should be a valid number". An
    unknown field comes first (a misspelt name also leaves its right name missing); a field name
    that is not plain text is quoted, so the message stays on one line."""
    errors = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")  # stable: otherwise pydantic's order
    first = next(iter(errors), {"loc": (), "msg": "invalid request"})
    where = ".".join(_field(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if first.get("type") == "missing" and not where:
        return "the request body is empty: send a JSON object"
    if first.get("type") in ("model_type", "model_attributes_type", "dict_type") and not where:
        return "the request body must be a JSON object"
    return f"{where}: {message}" if where else message


def _field(name: Any) -> str:
    text = str(name)
    return text if text.isidentifier() or text.isdigit() else repr(text)
