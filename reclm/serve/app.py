"""The FastAPI app over a :class:`~reclm.serve.engine.Recommender`.

Cheap endpoints are plain functions (run in the threadpool); the two that may wait for the profile writer are
``async`` and await its future, so slow generation never holds a worker thread that GETs need. Errors are JSON
``{"detail": ...}``: 404 unknown ids, 409 taken ids, 422 malformed payloads or out-of-bound sizes, 503 a full
writer queue, 504 a profile past its time limit, 500 anything unexpected (logged; the server carries on).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

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

log = logging.getLogger("reclm.serve")
ERRORS = {404: {"model": ErrorMessage}, 422: {"model": ErrorMessage}}


def scored(ranked: Ranked) -> list[ScoredItem]:
    return [ScoredItem(id=i, score=s, text=t) for i, s, t in zip(ranked.ids, ranked.scores, ranked.texts)]


def create_app(engine: Recommender, close_on_shutdown: bool = True) -> FastAPI:
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

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}): {exc}"})

    @app.get("/health", response_model=Health)
    def health() -> dict:
        """Model, catalog size, index, profile writer."""
        return engine.health()

    @app.get("/users/{user_id}/recommendations", response_model=Recommendations, responses=ERRORS)
    def user_recommendations(user_id: str, k: int = Query(20, ge=1, le=MAX_K)) -> Recommendations:
        """Top-k items the user has not interacted with in train (the dataset's raw ids)."""
        ranked = engine.recommend_user(user_id, k)
        return Recommendations(user=user_id, model=engine.choice.name, items=scored(ranked))

    @app.post("/recommendations", response_model=NewUserRecommendations, responses=ERRORS)
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

    @app.post("/items", response_model=NewItem, status_code=201, responses={**ERRORS, 409: {"model": ErrorMessage}})
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
