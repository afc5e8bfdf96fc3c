"""Layer-0 user and item representations from IDs and side features (the feature modes).

- ``none``: ID embeddings for users and items (the RecBole-comparable baseline).
- ``text``: item = MLP(item text embedding), no item ID embedding (unseen items can be scored);
  user = ID embedding.
- ``text+profiles``: the profile embeddings of both sides fused in; ``text+user-profiles`` and
  ``text+item-profiles`` fuse one side only (ablations).

Four strategies (``FUSIONS``; measurements in docs/cold-start.md):
- ``local`` (default): ``residual`` whose corrections graph backbones do not propagate (:class:`LocalFusion`).
- ``residual``: the ``text`` model plus a centred profile correction on each side; with uninformative
  profiles it is exactly the ``text`` model (:class:`ResidualFusion`).
- ``concat``: item = ReLU(Linear([MLP(text), MLP(item profile)])), user = ReLU(Linear([ID, MLP(user
  profile)])), separate MLPs and merge layers; graph backbones propagate items.
- ``paper``: the released RecLM code's towers: one profile MLP and one merge layer shared by users and
  items, L2-normalised items and user-profile part, and items NOT propagated through the graph, so a
  trained item and a new item get their final representation from the same content tower.

Every strategy replaces a missing profile by a learned "no profile" vector (:class:`ProfileInput`),
and in training drops a row's profile to that vector with probability ``profile_dropout``
(DropoutNet-style), so the model learns to rank ids whose profile is missing or uninformative.
Backbones read ``users(index)`` / ``items(index)`` (or ``all()``, and graph backbones ``graph_layer0()``) and
never touch features directly; a new strategy subclasses :class:`Fusion` and may add a training term through
``extra_loss``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures, uses_item_profiles, uses_user_profiles


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def xavier_init(module: nn.Module) -> None:
    """RecBole's initialisation: Xavier-uniform embeddings and linear weights, zero biases."""
    if isinstance(module, nn.Embedding):
        nn.init.xavier_uniform_(module.weight)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def as_buffer(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)


class ProfileInput(nn.Module):
    """One side's profile embeddings (buffers) with a learned "no profile" vector in the same space.

    The vector starts at the mean of the present profiles (mean imputation) and is trained; it stands
    for every id without a profile and, in training, for a ``dropout`` share of the others."""

    def __init__(self, vectors: np.ndarray, present: np.ndarray | None, dropout: float):
        super().__init__()
        self.register_buffer("vectors", as_buffer(vectors))
        mask = np.ones(len(vectors), dtype=bool) if present is None else np.asarray(present, dtype=bool)
        self.register_buffer("present", torch.as_tensor(mask))
        start = vectors[mask].mean(axis=0) if mask.any() else np.zeros(vectors.shape[1], np.float32)
        self.missing = nn.Parameter(torch.as_tensor(np.asarray(start, np.float32)))
        self.dropout = dropout

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def forward(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Profile rows ``index`` (all when None), the missing vector where a row has none or is dropped."""
        rows = self.vectors if index is None else self.vectors[index]
        present = self.present if index is None else self.present[index]
        if self.training and self.dropout > 0:
            present = present & (torch.rand(present.shape, device=present.device) >= self.dropout)
        return torch.where(present.unsqueeze(-1), rows, self.missing)

    def table(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, weights, slots)``: the distinct present profiles followed by the missing vector, each
        row's weight in the mean over every id of this side (in training with dropout, the expected mean),
        and the row that each of ids ``index`` (all when None) reads, dropped ones the last.

        A layer applied to ``rows`` then gathered by ``slots`` gives every id's output and the side's mean
        from one pass over the distinct profiles: profiles repeat (ml-100k: 71% of users share another's;
        MIND: most users have none), and a batch needs the mean anyway."""
        distinct, counts, slots = self.distinct_rows()
        keep = 1.0 - self.dropout if self.training else 1.0
        n_missing = (~self.present).sum().to(counts.dtype)
        missing_weight = n_missing + counts.sum() * (1.0 - keep)
        weights = torch.cat([counts * keep, missing_weight.reshape(1)]) / len(self.present)
        rows = torch.cat([distinct, self.missing.unsqueeze(0)])
        if index is not None:
            slots = slots[index]
        if self.training and self.dropout > 0:
            dropped = torch.rand(slots.shape, device=slots.device) < self.dropout
            slots = torch.where(dropped, len(distinct), slots)
        return rows, weights, slots

    def distinct_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct present profile vectors, their counts, and each id's row among them (the number of
        distinct rows for an id without a profile); cached until the buffers change."""
        version = (self.vectors._version, self.present._version, self.vectors.data_ptr())
        cached = getattr(self, "_distinct", None)
        if cached is None or cached[0] != version:
            rows, inverse, counts = torch.unique(
                self.vectors[self.present], dim=0, return_inverse=True, return_counts=True
            )
            slots = torch.full((len(self.present),), len(rows), dtype=torch.long, device=rows.device)
            slots[self.present] = inverse
            self._distinct = (version, rows, counts.to(self.vectors.dtype), slots)
        return self._distinct[1], self._distinct[2], self._distinct[3]

    def given(self, profile: torch.Tensor | None, count: int) -> torch.Tensor:
        """Profile rows of new ids: ``profile`` where given, else the missing vector for each of ``count``."""
        if profile is not None:
            return profile
        return self.missing.unsqueeze(0).expand(count, -1)


def profile_input(features: SideFeatures, side: str, config: CFConfig) -> ProfileInput:
    vectors = getattr(features, f"{side}_profiles")
    return ProfileInput(vectors, getattr(features, f"{side}_present"), config.profile_dropout)


class Fusion(nn.Module):
    """Interface every fusion strategy implements (see module docstring)."""

    mode: str
    out_dim: int
    propagates_items: bool = True  # graph backbones: final item = mean over layers (False: layer 0 as it is)

    def users(self, index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users(), self.items()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.all()

    def graph_layer0(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(users0, items0, start)`` for graph backbones: layer 0 (``all()``) and what layer 1 propagates
        from when it is not layer 0 itself (None), computed together so that shared parts run once."""
        users0, items0 = self.all()
        return users0, items0, None

    def encode_new_items_for_graph(
        self, text: torch.Tensor, profile: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items0, start)`` of new items for graph backbones: their layer 0 (``encode_new_items``) and what
        they give propagation (a folded-in user's layer 1 reads it): layer 0 itself, unless the fusion
        propagates something else (``graph_layer0``'s ``start``); computed together."""
        items0 = self.encode_new_items(text, profile)
        return items0, items0

    def contrastive_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``all()`` for the contrastive views of SGL / SimGCL: the same values, but the contrastive
        gradient reaches only per-node embedding tables (the ID embeddings); the shared feature
        encoders (text / profile MLPs, merge layers) are trained by the recommendation loss alone.
        Why: InfoNCE on one MLP shared by every item kept BPR from learning (docs/decisions.md)."""
        ids = self.id_parameter_names()
        shared = {
            name: param.detach() for name, param in self.named_parameters() if name not in ids and param.requires_grad
        }
        if not shared:
            return self.all()
        return torch.func.functional_call(self, shared, (), strict=False)

    def id_parameter_names(self) -> set[str]:
        """Names of the parameters that belong to nn.Embedding tables (one free vector per node)."""
        return {
            f"{module_name}.{name}" if module_name else name
            for module_name, module in self.named_modules()
            if isinstance(module, nn.Embedding)
            for name, _ in module.named_parameters(recurse=False)
        }

    def extra_loss(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor | None:
        """An additional training term on the batch's users and items (None: nothing to add)."""
        return None


class ConcatFusion(Fusion):
    """Separate MLPs for text and each side's profile, concatenated (with the user ID embedding) and projected."""

    def __init__(self, n_users: int, n_items: int, out_dim: int, mode: str, features: SideFeatures, config: CFConfig):
        super().__init__()
        features.require(mode, n_users, n_items)
        self.mode = mode
        self.out_dim = out_dim
        self.n_users, self.n_items = n_users, n_items
        hidden = list(config.feature_hidden)
        self.user_id = nn.Embedding(n_users, out_dim)
        if mode == "none":
            self.item_id = nn.Embedding(n_items, out_dim)
        else:
            self.register_buffer("item_text", as_buffer(features.item_text))
            self.text_mlp = mlp([features.item_text.shape[1], *hidden, out_dim])
        self.apply(xavier_init)  # first: a seed starts the text part as in the `text` mode
        self.user_profile = profile_input(features, "user", config) if uses_user_profiles(mode) else None
        self.item_profile = profile_input(features, "item", config) if uses_item_profiles(mode) else None
        with torch.random.fork_rng(devices=[]):  # the profile layers leave the random stream as `text` has it
            self.build_profile_layers(hidden, out_dim)

    def build_profile_layers(self, hidden: list[int], out_dim: int) -> None:
        """One profile MLP and one merge layer per side that has profiles."""
        for side, branch in (("user", self.user_profile), ("item", self.item_profile)):
            if branch is not None:
                setattr(self, f"{side}_profile_mlp", mlp([branch.dim, *hidden, out_dim]).apply(xavier_init))
                setattr(self, f"{side}_merge", nn.Linear(2 * out_dim, out_dim).apply(xavier_init))

    # ------------------------------------------------------------ representations of known ids
    def users(self, index: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.user_id.weight if index is None else self.user_id(index)
        if self.user_profile is None:
            return ids
        return self.merge_user(ids, self.user_profile(index))

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "none":
            return self.item_id.weight if index is None else self.item_id(index)
        if self.item_profile is None:
            return self.text_part(index)
        return self.merge_item(self.text_part(index), self.item_profile(index))

    def text_part(self, index: torch.Tensor | None) -> torch.Tensor:
        """MLP(item text) of items ``index`` (all when None); a batch with more rows than the catalogue has
        items (BiasMF / NCF read positives and negatives) runs the MLP once per item and gathers."""
        if index is None or len(index) >= self.n_items:
            out = self.text_mlp(self.item_text)
            return out if index is None else out[index]
        return self.text_mlp(self.item_text[index])

    def merge_user(self, id_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.user_merge(torch.cat([id_part, self.user_profile_mlp(profile)], dim=-1)))

    def merge_item(self, text_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.item_merge(torch.cat([text_part, self.item_profile_mlp(profile)], dim=-1)))

    # ------------------------------------------------------------ new users / items (serving)
    def encode_new_items(self, text: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 representation of items from their text (and profile) embeddings; no ID needed (a
        missing profile is the learned "no profile" vector)."""
        if self.mode == "none":
            raise ValueError("feature mode 'none' has only item ID embeddings: new items cannot be encoded")
        return self.with_new_item_profile(self.text_mlp(text), profile)

    def with_new_item_profile(self, text_part: torch.Tensor, profile: torch.Tensor | None) -> torch.Tensor:
        """New items' ``text_part`` with their profile fused in where the mode uses item profiles."""
        if self.item_profile is None:
            return text_part
        return self.merge_item(text_part, self.item_profile.given(profile, text_part.shape[0]))

    def encode_new_users(
        self, id_part: torch.Tensor | None = None, profile: torch.Tensor | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Layer-0 representation of users without a trained ID: ``id_part`` stands in for the ID
        embedding (e.g. the mean of their items' ID-space vectors; zeros when None), and where the mode
        uses user profiles the profile embedding is fused in (the "no profile" vector when None)."""
        count = n or (id_part.shape[0] if id_part is not None else profile.shape[0])
        if id_part is None:
            id_part = torch.zeros(count, self.out_dim, device=self.user_id.weight.device)
        if self.user_profile is None:
            return id_part
        return self.merge_user(id_part, self.user_profile.given(profile, count))


class PaperFusion(ConcatFusion):
    """The released RecLM code's towers (see module docstring): a shared profile MLP and merge layer,
    normalised items and user-profile part, items not propagated by graph backbones."""

    propagates_items = False

    def build_profile_layers(self, hidden: list[int], out_dim: int) -> None:
        """One profile MLP and one merge layer, shared by users and items."""
        dims = {p.dim for p in (self.user_profile, self.item_profile) if p is not None}
        if len(dims) > 1:
            raise ValueError(f"fusion 'paper' shares one profile MLP: user and item profile sizes differ ({dims})")
        if dims:
            self.profile_mlp = mlp([dims.pop(), *hidden, out_dim]).apply(xavier_init)
            self.merge = nn.Linear(2 * out_dim, out_dim).apply(xavier_init)

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        items = super().items(index)
        return items if self.mode == "none" else F.normalize(items, dim=-1)

    def encode_new_items(self, text: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(super().encode_new_items(text, profile), dim=-1)

    def merge_user(self, id_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        profile_part = F.normalize(self.profile_mlp(profile), dim=-1)
        return torch.relu(self.merge(torch.cat([id_part, profile_part], dim=-1)))

    def merge_item(self, text_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.merge(torch.cat([text_part, self.profile_mlp(profile)], dim=-1)))


class ResidualFusion(ConcatFusion):
    """Profiles as a centred correction added to the ``text`` model's representations: user = ID +
    c(MLP(user profile)), item = MLP(text) + c(MLP(item profile)), where c subtracts the correction's
    mean over every id of that side, with its gradient (also when a batch reads a few rows, as BiasMF
    and NCF do: a batch's own mean would centre positives and negatives differently, and a mean without
    gradient let the MLP grow along directions the centring hides) and each profile MLP's last layer
    starts at zero.

    Training starts from the ``text`` model, and where every profile is the same (all missing, all
    zero) the branch adds exactly nothing: the model is the ``text`` model, step for step. Profiles
    can only move ids relative to each other, never shift all of them (a shift of every user is an
    item-popularity bias learned on trained items, which misranks new ones)."""

    contains_text_model = True  # a profile mode holds the text model exactly (reclm.cf.trainer.load_text_model)

    def build_profile_layers(self, hidden: list[int], out_dim: int) -> None:
        """The concat fusion's layers (the same random draws, so a seed gives the same MLPs), without the
        merge layers (the correction is added), each MLP's last layer at zero."""
        super().build_profile_layers(hidden, out_dim)
        for side in ("user", "item"):
            if hasattr(self, f"{side}_merge"):
                delattr(self, f"{side}_merge")
                last = getattr(self, f"{side}_profile_mlp")[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def correction(self, side: str, index: torch.Tensor | None) -> torch.Tensor:
        """The centred profile correction of ``side``'s rows ``index`` (all rows when None): the MLP runs
        once over the distinct profiles, and the mean keeps its gradient (a detached mean let the MLP grow
        unchecked)."""
        branch, profile = getattr(self, f"{side}_profile_mlp"), getattr(self, f"{side}_profile")
        rows, weights, slots = profile.table(index)
        out = branch(rows)
        return out[slots] - weights @ out

    @torch.no_grad()
    def catalogue_mean(self, side: str) -> torch.Tensor:
        """The correction's mean over every known id of ``side``, for new ids (serving)."""
        rows, weights, _ = getattr(self, f"{side}_profile").table()
        return weights @ getattr(self, f"{side}_profile_mlp")(rows)

    def corrected(self, side: str, base: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``base`` rows of ``side`` plus their correction, where the mode uses that side's profiles."""
        return base if getattr(self, f"{side}_profile") is None else base + self.correction(side, index)

    def users(self, index: torch.Tensor | None = None) -> torch.Tensor:
        return self.corrected("user", self.user_id.weight if index is None else self.user_id(index), index)

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.item_profile is None:
            return super().items(index)
        return self.corrected("item", self.text_part(index), index)

    # the merges ConcatFusion's encode_new_users / encode_new_items call: new ids are centred by the
    # catalogue's mean, so a trained id re-encoded is unchanged
    def merge_user(self, id_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return id_part + self.user_profile_mlp(profile) - self.catalogue_mean("user")

    def merge_item(self, text_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return text_part + self.item_profile_mlp(profile) - self.catalogue_mean("item")


class LocalFusion(ResidualFusion):
    """The residual fusion with the profile corrections kept out of the graph: LightGCN, SGL and SimGCL
    propagate the ``text`` model's layer 0 (ID users, MLP(text) items) and each id's own correction enters its
    final mean at layer 0 only, so a user's representation never carries its items' corrections nor an item
    its users'; the contrastive views are the ``text`` model's. A new item (no edges) is scored as under
    ``residual``; BiasMF and NCF have no graph, so for them it is ``residual``. Why: docs/cold-start.md
    section 11 (SimGCL's new items sank when the corrections travelled the graph)."""

    def graph_layer0(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.mode == "none":
            return super().graph_layer0()
        ids, text = self.user_id.weight, self.text_part(None)  # the text MLP runs once for both
        return self.corrected("user", ids), self.corrected("item", text), (ids, text)

    def encode_new_items_for_graph(
        self, text: torch.Tensor, profile: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.text_mlp(text)  # once, for both
        return self.with_new_item_profile(start, profile), start

    def contrastive_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "none":
            return super().contrastive_all()
        return self.user_id.weight, self.text_mlp(self.item_text).detach()  # encoders: BPR only, as before


FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "paper": PaperFusion,
    "residual": ResidualFusion,
    "local": LocalFusion,
}


def build_fusion(
    name: str, n_users: int, n_items: int, out_dim: int, mode: str, features: SideFeatures, config: CFConfig
) -> Fusion:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}: expected one of {sorted(FUSIONS)}")
    return FUSIONS[name](n_users, n_items, out_dim, mode, features, config)
