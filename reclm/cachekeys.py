"""Cache keys from pydantic settings that survive new fields.

A stage or CF run is cached under a hash of its settings, defaults included, so that a changed default
reruns it. A field added later would then invalidate every run made before it existed; ``added_later``
marks such a field, and ``key_dump`` leaves it out of the key while it holds its default. Runs made
while the field was still in the key stay usable too: ``key_and_older`` builds that older key.
``key_with_defaults`` keeps settings that change no result (where a server is) at their defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import BaseModel, Field

# marks a field added after stage keys were first written (see ``added_later`` and ``key_dump``)
ADDED_LATER = "reclm_added_later"


def added_later(default: Any, **field_options: Any) -> Any:
    """A field added after runs were made: left out of cache keys while at its default (its default keeps
    the old behaviour), so those runs stay cached; any other value is part of the key. A new field whose
    default changes results bumps the stage's ``version`` instead."""
    return Field(default, json_schema_extra={ADDED_LATER: True}, **field_options)


_EVERY_FIELD = contextvars.ContextVar("reclm_every_field", default=False)


def key_dump(model: BaseModel, **dump_options: Any) -> dict[str, Any]:
    """``model.model_dump(...)`` for a cache key: every field, defaults included (a changed default changes
    the key), except ``added_later`` fields at their default."""
    dumped = model.model_dump(**dump_options)
    if not _EVERY_FIELD.get():
        drop_new_defaults(model, dumped)
    return dumped


@contextlib.contextmanager
def every_field() -> Iterator[None]:
    """``key_dump`` as it was before ``added_later``: every field in the key."""
    token = _EVERY_FIELD.set(True)
    try:
        yield
    finally:
        _EVERY_FIELD.reset(token)


def key_and_older(build: Callable[[], Any]) -> tuple[Any, Any]:
    """The key ``build`` makes now, and the one it made while ``added_later`` fields were still in keys
    (equal when none is at its default): a cache entry under either is the same work."""
    with every_field():
        older = build()
    return build(), older


def key_with_defaults(model: BaseModel, names: Iterable[str], **dump_options: Any) -> dict[str, Any]:
    """``key_dump(model)`` with the ``names`` fields at their class defaults: settings that change no result
    (where and how a server is reached) leave the key alone. Set to the defaults rather than dropped, so keys
    made before stay equal; an ``added_later`` one stays absent, as in the defaults' key."""
    dumped = key_dump(model, **dump_options)
    defaults = key_dump(type(model)(), **dump_options)
    for name in names:
        dumped.pop(name, None)
        if name in defaults:
            dumped[name] = defaults[name]
    return dumped


def drop_new_defaults(value: Any, dumped: Any) -> None:
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra
            field_value = getattr(value, name)
            if (
                isinstance(extra, dict)
                and extra.get(ADDED_LATER)
                and field_value == info.get_default(call_default_factory=True)
            ):
                dumped.pop(name, None)
            elif name in dumped:
                drop_new_defaults(field_value, dumped[name])
    elif isinstance(value, dict) and isinstance(dumped, dict):
        for key, item in value.items():
            if key in dumped:
                drop_new_defaults(item, dumped[key])
    elif isinstance(value, list | tuple) and isinstance(dumped, list):
        for item, item_dumped in zip(value, dumped, strict=False):
            drop_new_defaults(item, item_dumped)
