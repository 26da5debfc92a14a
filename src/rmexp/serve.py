"""An HTTP reward server for RL trainers: `python -m rmexp.serve checkpoint=<run or exported dir>`.

FastAPI on uvicorn, listening on `serve.host`:`serve.port` (127.0.0.1:5000):

- `POST /get_reward` `{"query": [prompt + response texts], "prompts": [prompt texts]}` -> `{"rewards": [...]}`:
  OpenRLHF's remote reward model (`--remote_rm_url http://host:5000/get_reward`). Each query must
  start with its prompt; the rest is the response. Other fields (OpenRLHF's `labels`) are ignored.
- `POST /score` `{"prompts": [...], "completions": [...]}` -> `{"rewards": [...]}`: TRL's
  reward-function call; prompts and completions are strings or chat message lists.
- `GET /health` -> the checkpoint, requests and texts served, and how many lost tokens to max_length.

Prompts and responses are formatted exactly as in training (chat template, system prompt,
truncation), and tokenized per request (an item the chat template rejects fails its own request
only). Texts of requests that arrive together (within `serve.batch_window_ms`, up to
`serve.max_batch`) are scored in one packed forward on one scoring thread. Bad input gets a 4xx
with `{"error": ..., "field": ...}` naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import hydra
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, to_typed

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
    wrapped again: prompt + answer is scored as the text it is."""
    sequences = []
    for i, (prompt, answer) in enumerate(items):
        try:
            if isinstance(prompt, str) and model.is_templated(prompt):
                sequences.append(model.text_tokens(prompt + answer))
            else:
                sequences.append(model.tokens(prompt, answer))
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and whatever a template raises
            raise BadRequest(f"{field}[{i}]", f"{field}[{i}] could not be formatted for the model: {e}") from None
    return sequences


def _same_length(body: dict, a: str, b: str) -> None:
    if len(body[a]) != len(body[b]):
        raise BadRequest(b, f"{len(body[a])} {a} but {len(body[b])} {b}: one each")


def _strip(text: str, lead: tuple[str, ...], trail: tuple[str, ...]) -> str:
    """`text` without repeats of the `lead` strings at its start and of the `trail` strings at its end."""
    changed = True
    while changed:
        changed = False
        for s in lead:
            if s and text.startswith(s):
                text, changed = text[len(s):], True
        for s in trail:
            if s and text.endswith(s):
                text, changed = text[:-len(s)], True
    return text


def parse_get_reward(body: Any, max_items: int, tokenizer) -> list[tuple[str, str]]:
    """OpenRLHF's request: (prompt, response) items, each response the query after its prompt.

    OpenRLHF decodes its sequences with special tokens: left padding and a closing EOS are dropped
    here, as its own reward server does."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    queries, prompts = _text_list(body, "query", max_items), _text_list(body, "prompts", max_items)
    _same_length(body, "query", "prompts")
    pads = (tokenizer.pad_token or "",)
    items = []
    for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        query, prompt = _strip(query, pads, pads + (tokenizer.eos_token or "",)), _strip(prompt, pads, ())
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
        too_large = JSONResponse({"error": f"request body over serve.max_request_bytes={self.max_bytes}",
                                  "field": "body"}, status_code=413)
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


def build_app(model, serve_cfg):
    """The FastAPI app around a loaded `RewardModel`."""
    stats = {"requests": 0, "texts": 0, "started": time.time()}
    batcher = Batcher(model.score_tokens, int(serve_cfg.max_batch), float(serve_cfg.batch_window_ms) / 1000)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rmexp reward server", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=int(serve_cfg.max_request_bytes))

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
            raise BadRequest("body", f"the body is not valid JSON: {e}") from None

    async def rewards_for(items, field: str) -> JSONResponse:
        sequences = await asyncio.get_running_loop().run_in_executor(None, encode, model, items, field)
        rewards = await batcher.submit(sequences)
        if model.normalize:
            rewards = model.normalized(rewards)
        stats["requests"] += 1
        stats["texts"] += len(items)
        return JSONResponse({"rewards": rewards})

    @app.post("/get_reward")
    async def get_reward(request: Request):
        items = parse_get_reward(await read_json(request), int(serve_cfg.max_items), model.tokenizer)
        return await rewards_for(items, "query")

    @app.post("/score")
    async def score(request: Request):
        return await rewards_for(parse_score(await read_json(request), int(serve_cfg.max_items)), "prompts")

    @app.get("/health")
    async def health():
        return {"status": "ok", "checkpoint": model.path, "normalize": model.normalize,
                "requests": stats["requests"], "texts": stats["texts"],
                "texts_truncated": model.n_truncated, "uptime_s": round(time.time() - stats["started"], 1)}

    return app


@hydra.main(config_path=CONF_PATH, config_name="serve", version_base="1.3")
def cli(cfg: DictConfig) -> None:
    import uvicorn

    from rmexp.reward_model import RewardModel

    cfg = to_typed(cfg)
    model = RewardModel.load(cfg.checkpoint, row_tokens=cfg.serve.row_tokens, normalize=cfg.serve.normalize)
    log.info("serving %s on http://%s:%d (POST /get_reward, POST /score, GET /health)",
             cfg.checkpoint, cfg.serve.host, cfg.serve.port)
    uvicorn.run(build_app(model, cfg.serve), host=cfg.serve.host, port=int(cfg.serve.port), log_level="warning")


if __name__ == "__main__":
    cli()
