"""Request and response models of the HTTP API (pydantic; they are also the OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from reclm.serve.engine import MAX_FIELD_CHARS, MAX_FIELDS, MAX_HISTORY, MAX_K, MAX_PROFILE_CHARS

RawId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
NewItemId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/\s]+$")]
FieldText = Annotated[str, StringConstraints(max_length=MAX_FIELD_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(BaseModel):
    id: str = Field(description="The item's raw id.")
    score: float = Field(description="The model's score (higher is better).")
    text: str = Field(description="The item's text fields.")


class Recommendations(BaseModel):
    user: str | None = Field(None, description="The user's raw id (none for a new user).")
    model: str = Field(description="The CF run that scored (RUN/cf/<name>).")
    items: list[ScoredItem]


class NewUserRequest(Strict):
    items: list[RawId] = Field(
        min_length=1,
        max_length=MAX_HISTORY,
        description="Raw ids of the items the user interacted with, oldest first (items added over HTTP too).",
    )
    k: int = Field(20, ge=1, le=MAX_K, description="How many items to return.")
    exclude_history: bool = Field(True, description="Leave the history's items out of the recommendations.")


class NewUserRecommendations(Recommendations):
    profile: str | None = Field(description="The profile written for this user (none when not written).")
    profile_status: str = Field(
        description="generated | cached (written before, from serve.sqlite) | disabled (--profile-backend none) | "
        "unused (the model takes no profiles)."
    )


class NewItemRequest(Strict):
    id: NewItemId | None = Field(None, description="Raw id for the item (default: new-<n>); must be unused.")
    fields: dict[str, FieldText] = Field(
        max_length=MAX_FIELDS, description="Text fields, named as the dataset's (see /health item_fields)."
    )
    profile: Annotated[str, StringConstraints(max_length=MAX_PROFILE_CHARS)] | None = Field(
        None, description="The item's profile, when known; otherwise the run's tuned writer writes it."
    )


class NewItem(BaseModel):
    id: str
    text: str = Field(description="The text the model's item encoder read.")
    profile: str | None
    profile_status: str = Field(description="generated | given | disabled | unused.")
    items: int = Field(description="Catalog size after the addition.")


class Profile(BaseModel):
    id: str
    kind: str = Field(description="user | item")
    profile: str
    source: str = Field(description="run (RUN/profiles) | generated | given")


class ErrorMessage(BaseModel):
    detail: str | list


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
