"""``reclm serve``: recommendations over HTTP from a finished run (FastAPI under uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from reclm.cli.common import app, console, friendly_errors


@app.command("serve")
@friendly_errors
def serve_command(
    run: Path = typer.Argument(..., help="Run directory with a trained CF model (RUN/cf/<name>/model.pt)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port."),
    model: str = typer.Option(None, help="CF run, e.g. cf/lightgcn-text+profiles-s2020 (default: best by --metric)."),
    metric: str = typer.Option("ndcg@20", help="Validation metric that picks the model."),
    profile_backend: str = typer.Option(
        "ct2", help="ct2 | transformers | none (new users from their history only, new items from text only)."
    ),
    base_model: str = typer.Option(None, help="Base LM of the profile writer (default: the run's llm.base_model)."),
    adapter: Path = typer.Option(None, help="User-profile adapter (default: RUN/rl, collab or sft adapter)."),
    item_adapter: Path = typer.Option(None, help="Item-profile adapter (default: RUN/item_sft/adapter or --adapter)."),
    no_adapter: bool = typer.Option(False, help="The base model writes profiles (no adapter)."),
    encoder: str = typer.Option(None, help="Text encoder (default: the run's embedding encoder)."),
    faiss_min_items: int = typer.Option(
        None, min=1, help="Catalog size from which FAISS does top-k (default: 100_000)."
    ),
    batch_size: int = typer.Option(16, min=1, help="Profiles written per batch."),
    batch_wait_ms: float = typer.Option(20.0, min=0, help="How long a lone profile request waits for company."),
    max_pending: int = typer.Option(256, min=1, help="Profile requests allowed to wait (more get 503)."),
    profile_timeout: float = typer.Option(600.0, min=1, help="Seconds before a profile request gets 504."),
    threads: int = typer.Option(None, min=1, help="CPU threads for generation (default: available cores)."),
    limit_concurrency: int = typer.Option(1024, min=1, help="Open connections before new ones get 503."),
    api_key_env: str = typer.Option(
        "RECLM_API_KEY", help="Environment variable holding the API key for writes (required off loopback)."
    ),
    allowed_host: list[str] = typer.Option(
        None, help="Host header to accept besides loopback names and --host (repeatable; '*' for any)."
    ),
    max_body_bytes: int = typer.Option(1 << 20, min=1, help="Largest request body (more get 413)."),
    max_added_items: int = typer.Option(10_000, min=0, help="Items clients may add (more get 403)."),
    max_stored_profiles: int = typer.Option(
        100_000, min=0, help="New users' profiles kept (more are answered, not stored)."
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    access_log: bool = typer.Option(False, help="Log every request."),
) -> None:
    """Serve recommendations over HTTP: known users, new users from their items, new items from their text."""
    import uvicorn

    from reclm.serve import AccessPolicy, Recommender, ServeOptions, create_app
    from reclm.serve.index import FAISS_MIN_ITEMS

    policy = AccessPolicy.for_bind(host, api_key_env, allowed_host or (), max_body_bytes)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    options = ServeOptions(
        model=model,
        metric=metric,
        profile_backend=profile_backend,
        base_model=base_model,
        adapter=adapter,
        item_adapter=item_adapter,
        no_adapter=no_adapter,
        encoder=encoder,
        faiss_min_items=faiss_min_items or FAISS_MIN_ITEMS,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        max_pending=max_pending,
        profile_timeout=profile_timeout,
        threads=threads,
        max_added_items=max_added_items,
        max_stored_profiles=max_stored_profiles,
    )
    engine = Recommender(run, options)
    info = engine.health()
    console.print(
        f"serving [bold]{info['model']['name']}[/] on {info['dataset']}: {info['users']} users, {info['items']} items "
        f"({info['added_items']} added), top-k by {info['index']}, profiles: {info['profiles']['backend']}",
        highlight=False,
    )
    uvicorn.run(
        create_app(engine, policy=policy),
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        limit_concurrency=limit_concurrency,
    )
