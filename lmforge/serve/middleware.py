"""ASGI middleware loaded into vLLM's API server (`--middleware`): `/ready` and per-adapter
metrics, in the engine's own process, so requests take no extra network hop.

`/ready` answers from the state file the supervisor writes (`LMFORGE_SERVE_STATE`):
200 only when the base model answered and every desired adapter that can be loaded is.
Metrics (`lmforge_serving_*`, labelled by adapter: the requested model name when it is the
base model or a known adapter, else `unknown`, so clients cannot blow up label sets) go
into the default Prometheus registry, which vLLM's `/metrics` serves beside its own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_ENV = "LMFORGE_SERVE_STATE"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

REQUESTS = Counter(
    "lmforge_serving_requests",
    "Generation requests answered, by adapter (base model name for the base) and status code.",
    ["adapter", "code"],
)
ERRORS = Counter(
    "lmforge_serving_errors",
    "Generation requests that failed, by adapter and kind (client: 4xx, server: 5xx).",
    ["adapter", "kind"],
)
GENERATED_TOKENS = Counter(
    "lmforge_serving_generated_tokens",
    "Tokens generated, by adapter (streams: one per content chunk).",
    ["adapter"],
)
PROMPT_TOKENS = Counter(
    "lmforge_serving_prompt_tokens",
    "Prompt tokens of non-streaming requests, by adapter.",
    ["adapter"],
)
IN_FLIGHT = Gauge("lmforge_serving_in_flight", "Requests being answered, by adapter.", ["adapter"])
LATENCY = Histogram(
    "lmforge_serving_request_seconds",
    "Time to the last byte of a generation request, by adapter.",
    ["adapter"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


class ServingState:
    """The supervisor's state file, re-read when it changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: float | None = None
        self.data: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if stamp != self._stamp:
            try:
                self.data = json.loads(self.path.read_text())
                self._stamp = stamp
            except (OSError, ValueError):  # mid-replace: keep the last good copy
                pass
        return self.data

    def known_models(self) -> set[str]:
        state = self.read()
        return {str(state.get("model", ""))} | set(state.get("adapters", {}))


def readiness(state: dict[str, Any]) -> tuple[bool, list[str]]:
    """Ready, and what is missing when not (pure: the state file's content in)."""
    reasons = []
    if not state:
        reasons.append("engine starting")
    elif not state.get("modelLoaded"):
        reasons.append(f"base model {state.get('model')}: {state.get('modelMessage', 'loading')}")
    for name, adapter in sorted((state.get("adapters") or {}).items()):
        # Pending (files not there yet) and Failed (the engine rejects it) adapters do not
        # hold readiness back: waiting cannot change them, and it would take the replica down.
        if adapter.get("state") == "Loading":
            reasons.append(f"adapter {name}: {adapter.get('message') or adapter.get('state')}")
    return not reasons, reasons


class ServingMiddleware:
    """Pure ASGI middleware (no response buffering on the streaming path)."""

    def __init__(self, app: App) -> None:
        self.app = app
        path = os.environ.get(STATE_ENV)
        self.state = ServingState(Path(path) if path else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/ready":
            await self._ready(send)
            return
        if scope.get("method") == "POST" and path in GENERATION_PATHS:
            await self._generation(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _ready(self, send: Send) -> None:
        state = self.state.read()
        ok, reasons = readiness(state)
        body = json.dumps({"ready": ok, "reasons": reasons, "state": state}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if ok else 503,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request body is small: read it to learn the model, then replay it to vLLM.
        chunks, more = [], True
        first: Message | None = None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        adapter = self._label(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                if first is not None:
                    return first
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        meter = _ResponseMeter(adapter)
        started = time.monotonic()
        IN_FLIGHT.labels(adapter).inc()

        async def metered_send(message: Message) -> None:
            meter.see(message)
            await send(message)

        try:
            await self.app(scope, replay, metered_send)
        except Exception:
            meter.status = 500
            raise
        finally:
            IN_FLIGHT.labels(adapter).dec()
            meter.finish(time.monotonic() - started)

    def _label(self, body: bytes) -> str:
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return "unknown"
        if not isinstance(model, str):
            return "unknown"
        return model if model in self.state.known_models() else "unknown"


class _ResponseMeter:
    """Counts status and tokens of one response as it passes through."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.status = 0
        self.streaming = False
        self.body: list[bytes] = []
        self.pending = b""
        self.tokens = 0
        self.prompt_tokens = 0

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            headers = dict(message.get("headers") or [])
            self.streaming = b"text/event-stream" in headers.get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            if self.streaming:
                self._count_events(chunk)
            elif self.status < 400:
                self.body.append(chunk)

    def _count_events(self, chunk: bytes) -> None:
        events = (self.pending + chunk).split(b"\n\n")
        self.pending = events.pop()
        for event in events:
            payload = event.removeprefix(b"data: ").strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("text"):
                    self.tokens += 1

    def finish(self, seconds: float) -> None:
        if not self.streaming and self.body:
            try:
                usage = json.loads(b"".join(self.body)).get("usage") or {}
                self.tokens = int(usage.get("completion_tokens") or 0)
                self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            except (ValueError, AttributeError, TypeError):
                pass
        status = self.status or 500
        REQUESTS.labels(self.adapter, str(status)).inc()
        if status >= 400:
            ERRORS.labels(self.adapter, "server" if status >= 500 else "client").inc()
        if self.tokens:
            GENERATED_TOKENS.labels(self.adapter).inc(self.tokens)
        if self.prompt_tokens:
            PROMPT_TOKENS.labels(self.adapter).inc(self.prompt_tokens)
        LATENCY.labels(self.adapter).observe(seconds)
