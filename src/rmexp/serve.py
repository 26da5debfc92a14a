"""An HTTP reward server for RL trainers: `python -m rmexp.serve checkpoint=<run or exported dir>`.

FastAPI on uvicorn, listening on `serve.host`:`serve.port` (127.0.0.1:5000):

- `POST /get_reward` `{"query": [prompt + response texts], "prompts": [prompt texts]}` -> `{"rewards": [...]}`:
  OpenRLHF's remote reward model (`--remote_rm_url http://host:5000/get_reward`). Each query must
  start with its prompt; the rest is the response. Other fields (OpenRLHF's `labels`) are ignored.
- `POST /score` `{"prompts": [...], "completions": [...]}` -> `{"rewards": [...]}`: TRL's
  reward-function call; prompts and completions are strings or chat message lists.
- A mean ensemble (rmexp-ensemble) answers both with `uncertainty` too: per item, its members' spread.
- `GET /health` (and `HEAD`) -> status, requests and texts served, how many lost tokens to max_length.

Prompts and responses are formatted exactly as in training (chat template, system prompt,
truncation): a prompt OpenRLHF already put through the chat template gets its response rendered as
the template's assistant turn, so the server reads each reward at the token training read it at.
Bodies are parsed and tokenized off the event loop (an item the chat template rejects fails its own
request only). Texts of requests that arrive together (within `serve.batch_window_ms`, up to
`serve.max_batch`) are scored in one packed forward on one scoring thread. Every error rmexp answers,
401, 404, 405, 408, 413 and 422 alike, is `{"error": ..., "field": ...}` naming the field, never a 500
(uvicorn's own 400 for a request that is not HTTP, and its 503 beyond `serve.max_connections`, are text).

Exposure: with `serve.api_key` (or `RMEXP_API_KEY`) every route but `/health` needs
`Authorization: Bearer <key>`; a request not read whole within `serve.read_timeout_s` gets a 408 and
its connection is closed; at most `serve.max_connections` are served at once (503 beyond); the API
docs (`/docs`, `/redoc`, `/openapi.json`) are off unless `serve.docs=true`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # rmexp installed without its `serve` extra
    raise ImportError(f"the reward server needs rmexp's serve extra: pip install 'rmexp[serve]' ({e})") from e

from rmexp import console
from rmexp.config import CONF_PATH, ServeConfig, to_typed
from rmexp.errors import UserError
from rmexp.rundir import locate

log = logging.getLogger("rmexp.serve")


ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def _text_list(body: dict, key: str, max_items: int, messages_ok: bool = False) -> list:
    """body[key] as a list of strings (or chat message lists where `messages_ok`), or a BadRequest naming it."""
    if key not in body:
        raise BadRequest(key, f"missing field {key!r}")
    items = body[key]
    if not isinstance(items, list):
        raise BadRequest(key, f"{key!r} must be a list of {'strings or message lists' if messages_ok else 'strings'}")
    if len(items) > max_items:
        raise BadRequest(key, f"{key!r} has {len(items)} items; the limit is serve.max_items={max_items}", 413)
    for i, item in enumerate(items):
        if isinstance(item, str):
            continue
        if messages_ok and isinstance(item, list) and item and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in item):
            continue
        kind = "a string or a non-empty list of {role, content} messages" if messages_ok else "a string"
        raise BadRequest(f"{key}[{i}]", f"{key}[{i}] must be {kind} (roles: {', '.join(ROLES)}), "
                                        f"got {json.dumps(item)[:200]}")
    return items


def encode(model, items: list, field: str) -> list[list[int]]:
    """Token ids of each (prompt, answer) item, formatted as in training; an item the model's chat
    template rejects (say, roles out of order) is a BadRequest naming it, before any batch sees it.
    A prompt that already went through the chat template (OpenRLHF's `--apply_chat_template`) is not
    wrapped again: its answer is rendered as the template's assistant turn after it."""
    sequences = []
    for i, (prompt, answer) in enumerate(items):
        try:
            if isinstance(prompt, str) and isinstance(answer, str) and model.is_templated(prompt):
                sequences.append(model.templated_tokens(prompt, answer))
            else:
                sequences.append(model.tokens(prompt, answer))
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and whatever a template raises
            raise BadRequest(f"{field}[{i}]", f"{field}[{i}] could not be formatted for the model: {e}") from None
    return sequences


def _same_length(body: dict, a: str, b: str) -> None:
    if len(body[a]) != len(body[b]):
        raise BadRequest(b, f"{len(body[a])} {a} but {len(body[b])} {b}: one each")


def strip(text: str, lead: tuple[str, ...], trail: tuple[str, ...]) -> str:
    """`text` without repeats of the `lead` strings at its start and of the `trail` strings at its
    end: the ends are found by counting (linear in what is removed) and the text is sliced once."""
    lead, trail = tuple(s for s in lead if s), tuple(s for s in trail if s)
    start, end = 0, len(text)
    moved = True
    while moved:
        moved = False
        for s in lead:
            while text.startswith(s, start, end):
                start, moved = start + len(s), True
    moved = True
    while moved:
        moved = False
        for s in trail:
            while end - len(s) >= start and text.endswith(s, start, end):
                end, moved = end - len(s), True
    return text[start:end]


def parse_get_reward(body: Any, max_items: int, tokenizer) -> list[tuple[str, str]]:
    """OpenRLHF's request: (prompt, response) items, each response the query after its prompt.

    OpenRLHF decodes its sequences with special tokens: pads on either side and closing EOS tokens
    are dropped here, as its own reward server does."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    queries, prompts = _text_list(body, "query", max_items), _text_list(body, "prompts", max_items)
    _same_length(body, "query", "prompts")
    pads, eos = (tokenizer.pad_token or "",), (tokenizer.eos_token or "",)
    items = []
    for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        query, prompt = strip(query, pads, pads + eos), strip(prompt, pads, ())
        if not query.startswith(prompt):
            raise BadRequest(f"query[{i}]", f"query[{i}] does not start with prompts[{i}]")
        items.append((prompt, query[len(prompt):]))
    return items


def parse_score(body: Any, max_items: int) -> list[tuple[Any, Any]]:
    """TRL-style request: (prompt, completion) items."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    prompts = _text_list(body, "prompts", max_items, messages_ok=True)
    completions = _text_list(body, "completions", max_items, messages_ok=True)
    _same_length(body, "prompts", "completions")
    return list(zip(prompts, completions, strict=True))


class Batcher:
    """Collects the items of requests that arrive together and scores them in one call on one thread."""

    def __init__(self, score, max_batch: int, window_s: float):
        self.score, self.max_batch, self.window_s = score, max_batch, window_s
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Queue, thread and task of one serving lifetime (an app started again gets new ones)."""
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmexp-score")
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: list) -> list[float]:
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + self.window_s
            while n < self.max_batch:
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                    break
                batch.append(nxt)
                n += len(nxt[0])
            items = [item for request, _ in batch for item in request]
            try:
                rewards = await loop.run_in_executor(self.executor, self.score, items)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the server lives on
                log.exception("scoring failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            at = 0
            for request, future in batch:
                if not future.done():  # a client that went away
                    future.set_result(rewards[at:at + len(request)])
                at += len(request)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (declared or streamed) gets a 413 before it is read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error(413, f"request body over serve.max_request_bytes={self.max_bytes}", "body")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class ApiKey:
    """ASGI middleware: every route but `/health` needs `Authorization: Bearer <key>` (compared in
    constant time, so the answer's timing tells nothing of the key)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                        "with the key the server was started with", "authorization",
                                   {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


def error(status: int, message: str, field: str, headers: dict | None = None) -> JSONResponse:
    """The one shape of every error answer."""
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def api_key(serve_cfg) -> str | None:
    """`serve.api_key` (by default the environment's `RMEXP_API_KEY`, which keeps the key out of the
    saved config and the process list); None or empty: no key."""
    return serve_cfg.api_key or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, treat it as reachable from outside
        return False


def build_app(model, serve_cfg):
    """The FastAPI app around a loaded `RewardModel`."""
    stats = {"requests": 0, "texts": 0, "started": time.time()}
    ensemble = hasattr(model, "last_uncertainty")  # an EnsembleRewardModel (rmexp-ensemble mode=mean)

    def score(sequences):  # on the batcher's one scoring thread: last_uncertainty is this batch's
        rewards = model.score_tokens(sequences)
        return list(zip(rewards, model.last_uncertainty.tolist(), strict=True)) if ensemble else rewards

    batcher = Batcher(score, int(serve_cfg.max_batch), float(serve_cfg.batch_window_ms) / 1000)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    docs = bool(serve_cfg.docs)
    app = FastAPI(title="rmexp reward server", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.add_middleware(BodyLimit, max_bytes=int(serve_cfg.max_request_bytes))
    key = api_key(serve_cfg)
    if key:
        app.add_middleware(ApiKey, key=key)  # outermost: no body is read for a request without the key

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return error(exc.status, exc.message, exc.field)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # routing's 404 and 405
        field = {404: "path", 405: "method"}.get(exc.status_code, "request")
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", field, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, exc):
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected before its %s %s body was read", client, request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it

    def prepare(raw: bytes, parse, field: str) -> tuple[list, list[list[int]]]:
        """Parse, check and tokenize a body: run on a worker thread, off the event loop."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
            raise BadRequest("body", f"the body is not valid JSON: {e}") from None
        items = parse(body)
        return items, encode(model, items, field)

    async def rewards_for(request: Request, parse, field: str) -> JSONResponse:
        raw = await request.body()
        items, sequences = await asyncio.get_running_loop().run_in_executor(None, prepare, raw, parse, field)
        rewards = await batcher.submit(sequences)  # normalized by score_tokens under serve.normalize
        stats["requests"] += 1
        stats["texts"] += len(items)
        if ensemble:  # `rewards` as OpenRLHF reads it, and the members' spread beside it
            return JSONResponse({"rewards": [r for r, _ in rewards], "uncertainty": [u for _, u in rewards]})
        return JSONResponse({"rewards": rewards})

    max_items = int(serve_cfg.max_items)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await rewards_for(request, lambda body: parse_get_reward(body, max_items, model.tokenizer), "query")

    @app.post("/score")
    async def score(request: Request):
        return await rewards_for(request, lambda body: parse_score(body, max_items), "prompts")

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        return {"status": "ok", "normalize": model.normalize, "requests": stats["requests"], "texts": stats["texts"],
                "texts_truncated": model.n_truncated, "uptime_s": round(time.time() - stats["started"], 1)}

    return app


def warn_if_exposed(serve_cfg) -> None:
    if not is_loopback(serve_cfg.host) and not api_key(serve_cfg):
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model and "
                    "its compute; set RMEXP_API_KEY (or serve.api_key) to require 'Authorization: Bearer <key>'",
                    serve_cfg.host)


def server_config(serve_cfg) -> dict:
    """uvicorn's settings, bounded: `serve.max_connections` at once, idle keep-alive connections
    closed after `serve.keep_alive_s`, a request not read whole within `serve.read_timeout_s`
    answered 408 and closed."""
    from rmexp._compat import check_server, read_timeout_protocol

    check_server()  # the uvicorn internals the read deadline builds on, named if an upgrade moved them
    timeout = float(serve_cfg.read_timeout_s)
    body = json.dumps({"error": f"the request was not read whole within serve.read_timeout_s={timeout:g} s",
                       "field": "body"}).encode()
    return {"host": serve_cfg.host, "port": int(serve_cfg.port), "log_level": "warning",
            "http": read_timeout_protocol(timeout, body), "limit_concurrency": int(serve_cfg.max_connections),
            "timeout_keep_alive": int(serve_cfg.keep_alive_s)}


def check_port(host: str, port: int) -> None:
    """The address is free to listen on, before the model loads (minutes for an 8B model) rather than after."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServerStartError(f"serve.host={host}: not an address this machine can listen on ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT socket is no use
        try:
            probe.bind(address)
        except OSError as e:
            raise ServerStartError(f"serve.port={port}: cannot listen on {host}:{port} ({e.strerror}); another "
                                   "server may hold it: pick another with serve.port=<port>") from None


class ServerStartError(UserError):
    """The server cannot start where the config says (an address in use, a host that is not this machine's)."""


@hydra.main(config_path=CONF_PATH, config_name="serve", version_base="1.3")
def app(cfg: DictConfig) -> None:
    import uvicorn

    with console.reported():
        cfg = to_typed(cfg)
        locate(Path(cfg.checkpoint).expanduser())  # what the path holds, before torch loads
        check_port(cfg.serve.host, int(cfg.serve.port))
        from rmexp.reward_model import RewardModel

        model = RewardModel.load(cfg.checkpoint, row_tokens=cfg.serve.row_tokens, normalize=cfg.serve.normalize,
                                 device=cfg.device)
    log.info("serving %s on http://%s:%d (POST /get_reward, POST /score, GET /health)%s",
             cfg.checkpoint, cfg.serve.host, cfg.serve.port, "; API key required" if api_key(cfg.serve) else "")
    warn_if_exposed(cfg.serve)
    uvicorn.run(build_app(model, cfg.serve), **server_config(cfg.serve))


def cli() -> None:
    console.run(app, ServeConfig)


if __name__ == "__main__":
    cli()
