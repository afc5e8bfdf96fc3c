"""The FastAPI app over a :class:`~reclm.serve.engine.Recommender`, behind an
:class:`~reclm.serve.security.AccessPolicy` (API key for writes, trusted ``Host`` names, body size limit).

Cheap endpoints are plain functions (run in the threadpool); the two that may wait for the profile writer are
``async`` and await its future, so slow generation never holds a worker thread that GETs need. Errors are JSON
``{"detail": ...}``: 400 a ``Host`` not allowed or an endpoint the model cannot serve (new items for an
ID-only model), 401 a missing or wrong API key, 403 a keyless write off loopback or a full store (more added
items than ``max_added_items``), 404 unknown ids, 409 taken ids, 413 a body over the limit, 422 malformed
payloads, NaN / Infinity or out-of-bound sizes (the offending input is not echoed), 503 a full writer queue,
504 a profile past its time limit, 500 anything unexpected (logged with a reference; the reply shows only the
reference; the server carries on).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reclm.serve.engine import MAX_K, Ranked, Recommender, ServeError
from reclm.serve.schemas import (
    ErrorMessage,
    Health,
    NewItem,
    NewItemRequest,
    NewUserRecommendations,
    NewUserRequest,
    Profile,
    Recommendations,
    ScoredItem,
)
from reclm.serve.security import AccessPolicy, GuardMiddleware, given_key, is_loopback, local_host

log = logging.getLogger("reclm.serve")
ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorMessage}, 422: {"model": ErrorMessage}}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **{status: {"model": ErrorMessage} for status in (401, 403, 413, 503, 504)},
}
SHOWN_CHARS = 100  # longest client-given string (a dict key in an error's location) an error repeats


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a client-given string with a lone surrogate (``"\\ud800"`` in the JSON it
    sent) is repeated escaped, where UTF-8 encoding would fail with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class Unauthorized(ServeError):
    status = 401


class Forbidden(ServeError):
    status = 403


def shown(value: Any) -> Any:
    """A JSON-safe scalar for an error body: long strings cut, NaN / Infinity and objects as text."""
    if isinstance(value, str):
        return value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "..."
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return shown(str(value))


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """pydantic's errors without ``input`` (never echo what the client sent) nor ``url``."""
    cleaned = []
    for error in exc.errors():
        entry = {"type": shown(error.get("type")), "loc": [shown(p) for p in error.get("loc", ())]}
        entry["msg"] = shown(error.get("msg"))
        ctx = error.get("ctx")
        if isinstance(ctx, dict):
            entry["ctx"] = {str(k): shown(v) for k, v in ctx.items()}
        cleaned.append(entry)
    return cleaned


def internal_error(request_line: str, exc: BaseException) -> JSONResponse:
    """Log ``exc`` with a reference; the reply names only the reference."""
    reference = secrets.token_hex(4)
    log.error("unexpected error %s on %s", reference, request_line, exc_info=exc)
    detail = f"internal error (reference {reference}; see the server log)"
    return ErrorResponse(status_code=500, content={"detail": detail})


class CatchAllMiddleware:
    """Unexpected errors become a JSON 500 here and go no further: Starlette's own last-resort handler sends
    the 500 and then re-raises, and uvicorn then drops the connection (a keep-alive client's next request on it
    fails)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            await internal_error(f"{scope.get('method')} {scope.get('path')}", exc)(scope, receive, send)


def scored(ranked: Ranked) -> list[ScoredItem]:
    return [ScoredItem(id=i, score=s, text=t) for i, s, t in zip(ranked.ids, ranked.scores, ranked.texts)]


def create_app(engine: Recommender, close_on_shutdown: bool = True, policy: AccessPolicy | None = None) -> FastAPI:
    """The app; ``policy`` defaults to a loopback server's (:meth:`AccessPolicy.for_bind`: the key, if any,
    from ``$RECLM_API_KEY``, loopback ``Host`` names)."""
    policy = policy or AccessPolicy.for_bind("127.0.0.1")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed by writing endpoints.")

    def may_write(request: Request, _: str | None = Depends(header_key)) -> None:
        """Writing endpoints: the key when the server has one; without one, only a loopback connection."""
        if policy.api_key is None:
            local = local_host(request.scope)
            if local is not None and not is_loopback(local):
                raise Forbidden(f"writes off loopback need an API key: start the server with ${policy.key_env} set")
            return
        if not policy.key_ok(given_key(request.headers)):
            raise Unauthorized("missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_on_shutdown:
            engine.close()

    app = FastAPI(
        title="reclm",
        summary="RecLM recommendations: known users, new users described by their items, new items as text.",
        version="1",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.policy = policy
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(GuardMiddleware, policy=policy)  # outermost

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return ErrorResponse(status_code=exc.status, content={"detail": str(exc)}, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ErrorResponse(status_code=422, content={"detail": validation_errors(exc)})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # errors in the middleware itself
        return internal_error(f"{request.method} {request.url.path}", exc)

    @app.get("/health", response_model=Health)
    def health() -> dict:
        """Model, catalog size, index, profile writer."""
        return engine.health()

    @app.get("/users/{user_id}/recommendations", response_model=Recommendations, responses=ERRORS)
    def user_recommendations(user_id: str, k: int = Query(20, ge=1, le=MAX_K)) -> Recommendations:
        """Top-k items the user has not interacted with in train (the dataset's raw ids)."""
        ranked = engine.recommend_user(user_id, k)
        return Recommendations(user=user_id, model=engine.choice.name, items=scored(ranked))

    @app.post(
        "/recommendations",
        response_model=NewUserRecommendations,
        responses=WRITE_ERRORS,
        dependencies=[Depends(may_write)],
    )
    async def new_user_recommendations(body: NewUserRequest) -> NewUserRecommendations:
        """Top-k items for a new user given by the items they interacted with: a profile is written with the
        run's tuned model (cached), embedded, fused with the history's items, and scored."""
        history = engine.resolve_history(body.items)
        outcome = await engine.new_user_profile(history, body.items)
        ranked = await run_in_threadpool(
            engine.recommend_history, history, outcome.vector, body.k, body.exclude_history
        )
        return NewUserRecommendations(
            model=engine.choice.name, items=scored(ranked), profile=outcome.profile, profile_status=outcome.status
        )

    @app.post(
        "/items",
        response_model=NewItem,
        status_code=201,
        responses={**WRITE_ERRORS, 400: {"model": ErrorMessage}, 409: {"model": ErrorMessage}},
        dependencies=[Depends(may_write)],
    )
    async def add_item(body: NewItemRequest) -> NewItem:
        """Add an item from its text fields: its profile is written (unless given) and embedded, and it is
        recommendable as soon as this returns. Kept in RUN/serve.sqlite across restarts."""
        item = await engine.add_item(body.id, body.fields, body.profile)
        return NewItem(
            id=item.id,
            text=item.text,
            profile=item.profile,
            profile_status=item.profile_source,
            items=len(engine.item_ids),
        )

    @app.get("/users/{user_id}/profile", response_model=Profile, responses=ERRORS)
    def user_profile(user_id: str) -> Profile:
        return Profile(id=user_id, kind="user", profile=engine.user_profile(user_id), source="run")

    @app.get("/items/{item_id}/profile", response_model=Profile, responses=ERRORS)
    def item_profile(item_id: str) -> Profile:
        profile, source = engine.item_profile(item_id)
        return Profile(id=item_id, kind="item", profile=profile, source=source)

    return app
