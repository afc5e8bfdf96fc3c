"""Teachers turn our prompts into target profiles: ``file`` (shipped profiles), ``openai`` (any
OpenAI-compatible endpoint) and ``offline`` (a rule-based stand-in, not an LLM). Each writes
``RUN/teacher/{users,items}.jsonl`` records ``{kind, id, prompt, profile}``."""

from __future__ import annotations

from reclm.llm.teachers.base import Teacher, TeacherReport
from reclm.llm.teachers.file import FileTeacher
from reclm.llm.teachers.offline import OfflineTeacher
from reclm.llm.teachers.openai_compat import EndpointConfig, EndpointError, Ledger, OpenAITeacher, SpendingCapReached

TEACHERS: dict[str, type[Teacher]] = {"file": FileTeacher, "openai": OpenAITeacher, "offline": OfflineTeacher}


def make_teacher(kind: str, **options) -> Teacher:
    """A teacher by name; ``options`` go to its constructor."""
    if kind not in TEACHERS:
        raise ValueError(f"teacher kind {kind!r}: expected one of {sorted(TEACHERS)}")
    return TEACHERS[kind](**options)


__all__ = [
    "TEACHERS",
    "EndpointConfig",
    "EndpointError",
    "FileTeacher",
    "Ledger",
    "OfflineTeacher",
    "OpenAITeacher",
    "SpendingCapReached",
    "Teacher",
    "TeacherReport",
    "make_teacher",
]
