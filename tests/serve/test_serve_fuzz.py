"""Property-based fuzz of every endpoint of the app's own OpenAPI schema (hypothesis, derandomized and bounded):
requests drawn from the schema (path and query parameters, JSON bodies), mixed with known ids, any JSON (NaN,
Infinity, huge numbers, deep nesting) and raw bytes, sent to the real app over the tiny run with the tiny
tuned writer. No answer may be a 5xx, and every answer must be a JSON body (errors: ``{"detail": ...}``).

Failures are collected, not raised at once, so that one run counts them all: ``FUZZ`` holds the cases tried and
the failures found per operation (``pytest -s`` prints them)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from reclm.serve import AccessPolicy, Recommender, ServeOptions, create_app

KEY = "fuzz-key-0123456789abcdef"
EXAMPLES = 60  # per operation: the whole fuzz stays well under 30 s on two cores
FUZZ: dict[str, Counter] = {"tried": Counter(), "failed": Counter(), "status": Counter()}
FAILURES: list[str] = []

finite = st.floats(allow_nan=False, allow_infinity=False)
lone = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone surrogates: "\\ud800" in JSON
words = st.text(max_size=20) | lone | st.sampled_from(["1", "7"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | words
any_json = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(words, inner, max_size=4), max_leaves=12
)


@pytest.fixture(scope="module")
def fuzzed(served_run, cache_dir, tiny_lm, tmp_path_factory):
    """``(client, schema, hints)``: the app over a copy of the run (LightGCN text+profiles, the tiny tuned writer),
    behind an API key that the client sends."""
    root, info = served_run
    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(root, run, ignore=shutil.ignore_patterns("serve.sqlite*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECLM_CACHE", str(cache_dir))
        options = ServeOptions(
            model="cf/lightgcn-text+profiles-s2020", profile_backend="transformers", batch_wait_ms=0, threads=1
        )
        engine = Recommender(run, options)
        app = create_app(engine, policy=AccessPolicy.for_bind("127.0.0.1", environ={"RECLM_API_KEY": KEY}))
        client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False, headers={"X-API-Key": KEY})
        data = info["data"]
        hints = {"user_id": list(data.user_ids), "item_id": list(data.item_ids), "field": list(data.item_fields)}
        yield client, app.openapi(), hints
        print(f"\nAPI fuzz: {sum(FUZZ['tried'].values())} cases, {sum(FUZZ['failed'].values())} failures", FUZZ)
        engine.close()


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """``one_of`` with weights (hypothesis' own ``one_of`` picks its branches evenly)."""
    picks = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda i: choices[i][1])


def strategy(schema: dict, components: dict, hints: dict, name: str = "") -> st.SearchStrategy:
    """Values valid for a JSON schema (the subset FastAPI writes), with known ids and names mixed in."""
    if "$ref" in schema:
        return strategy(components[schema["$ref"].rsplit("/", 1)[1]], components, hints, name)
    if "anyOf" in schema:
        return st.one_of([strategy(s, components, hints, name) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", ()))
        props = {k: strategy(v, components, hints, k) for k, v in schema["properties"].items()}
        optional = {k: v for k, v in props.items() if k not in required}
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required}, optional=optional)
    if kind == "object":
        keys = weighted((9, st.sampled_from(hints["field"])), (1, words))
        values = strategy(schema.get("additionalProperties", {}), components, hints)
        return st.dictionaries(keys, values, min_size=1, max_size=min(int(schema.get("maxProperties", 4)), 4))
    if kind == "array":
        low = int(schema.get("minItems", 0))
        items = strategy(schema.get("items", {}), components, hints, "item_id" if name == "items" else "")
        return st.lists(items, min_size=low, max_size=max(low, min(int(schema.get("maxItems", 6)), 6)))
    if kind == "string":
        low, high = int(schema.get("minLength", 0)), int(schema.get("maxLength", 40))
        some = weighted((1, st.text(max_size=40)), (3, st.text(min_size=1, max_size=40)), (1, lone))  # few empty
        text = st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else some
        text = text.filter(lambda s: low <= len(s) <= high)
        known = hints.get(name) or hints.get("item_id" if name in ("id", "item_id") else "", [])
        return weighted((1, st.sampled_from(known)), (1, text)) if known else text
    if kind == "integer":
        return st.integers(int(schema.get("minimum", -(2**31))), int(schema.get("maximum", 2**31)))
    if kind == "number":
        return finite
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return any_json


def operation_request(operation: tuple[str, str], schema: dict, hints: dict) -> st.SearchStrategy:
    method, path = operation
    spec = schema["paths"][path][method]
    components = schema["components"]["schemas"]
    parts: dict[str, st.SearchStrategy] = {}
    for parameter in spec.get("parameters", ()):
        valid = strategy(parameter["schema"], components, hints, parameter["name"])
        other = any_json if parameter["in"] == "query" else st.text(max_size=300)
        parts[parameter["name"]] = weighted((2, valid), (1, other))
    if "requestBody" in spec:
        body_schema = spec["requestBody"]["content"]["application/json"]["schema"]
        valid = strategy(body_schema, components, hints)
        as_json = weighted((3, valid), (1, any_json)).map(lambda v: json.dumps(v, allow_nan=True).encode())
        parts["body"] = weighted((4, as_json), (1, st.binary(max_size=64)))
        parts["content-type"] = st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x-www-form"])
    return st.fixed_dictionaries(parts)


def check(operation: tuple[str, str], request: dict[str, Any], client: TestClient) -> None:
    method, path = operation
    url, query = path, {}
    for name, value in request.items():  # lone surrogates travel as the bytes of their UTF-8 form
        if "{" + name + "}" in url:
            url = url.replace("{" + name + "}", quote(str(value), safe="", errors="surrogatepass"))
        elif name not in ("body", "content-type"):
            query[name] = json.dumps(value, allow_nan=True) if not isinstance(value, str | int) else value
    if query:
        url += "?" + urlencode(query, errors="surrogatepass", quote_via=quote)
    headers = {"content-type": request["content-type"]} if "content-type" in request else {}
    response = client.request(method.upper(), url, content=request.get("body"), headers=headers)
    FUZZ["tried"][f"{method.upper()} {path}"] += 1
    FUZZ["status"][f"{method.upper()} {path} {response.status_code}"] += 1
    problem = problem_of(response)

    if problem is not None:
        FUZZ["failed"][f"{method.upper()} {path}"] += 1
        FAILURES.append(f"{method.upper()} {url} {request!r:.300}: {problem}: {response.text[:200]}")


def problem_of(response) -> str | None:
    """What is wrong with an answer: a 5xx, a body that is not JSON, an error without ``detail``."""
    if response.status_code >= 500:
        return f"{response.status_code}"
    if response.headers.get("content-type") != "application/json":
        return f"{response.status_code} not JSON ({response.headers.get('content-type')})"
    try:
        body = response.json()
    except ValueError:
        return "unparsable JSON"
    if response.status_code >= 400 and not (isinstance(body, dict) and body.get("detail")):
        return f"{response.status_code} without detail"
    return None


OPERATIONS = [
    ("get", "/health"),
    ("get", "/users/{user_id}/recommendations"),
    ("post", "/recommendations"),
    ("post", "/items"),
    ("get", "/users/{user_id}/profile"),
    ("get", "/items/{item_id}/profile"),
]


def test_the_fuzz_covers_every_operation_of_the_schema(fuzzed):
    _, schema, _ = fuzzed
    assert {(m, p) for p, ops in schema["paths"].items() for m in ops} == set(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(fuzzed, operation):
    client, schema, hints = fuzzed
    before = len(FAILURES)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(operation_request(operation, schema, hints))
    def fuzz(request: dict[str, Any]) -> None:
        check(operation, request, client)

    fuzz()
    assert FAILURES[before:] == [], f"{len(FAILURES) - before} failures, first: {FAILURES[before : before + 5]}"
    assert client.get("/health").status_code == 200
