"""Layer-0 user and item representations from IDs and side features (the feature modes).

- ``none``: ID embeddings for users and items (the RecBole-comparable baseline).
- ``text``: item = MLP(item text embedding), no item ID embedding (unseen items can be scored);
  user = ID embedding.
- ``text+profiles``: item = ReLU(Linear(concat(MLP(text), MLP(item profile)))); user =
  ReLU(Linear(concat(ID embedding, MLP(user profile)))).

Backbones read ``users(index)`` / ``items(index)`` (or ``all()``) and never touch features directly.
Fusion strategies are registered in ``FUSIONS``; a new one (e.g. RLMRec-style contrastive alignment
between CF and profile spaces) subclasses :class:`Fusion` and may add a training term through
``extra_loss``, which the trainer adds to the backbone's loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reclm.cf.config import CFConfig
from reclm.cf.features import SideFeatures


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


class Fusion(nn.Module):
    """Interface every fusion strategy implements (see module docstring)."""

    mode: str
    out_dim: int

    def users(self, index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users(), self.items()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.all()

    def contrastive_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``all()`` for the contrastive views of SGL / SimGCL: the same values, but the contrastive
        gradient reaches only per-node embedding tables (the ID embeddings); the shared feature
        encoders (text / profile MLPs, merge layers) are trained by the recommendation loss alone.

        Why (issue 2): InfoNCE asks every node to be told apart from the batch's others. With ID
        embeddings each node has its own free vector for that; a text-built item has none, so the
        loss pushes on the one MLP shared by all items. On ml-100k (SimGCL ``text``) its gradient on
        that MLP stayed 700-1000x the BPR gradient epoch after epoch, held the encoder's outputs spread
        evenly over the sphere, and BPR never left 0.693 (test Recall@20 0.023; LayerNorm / L2-scaled
        encoder outputs changed nothing, and bringing the SSL term back after a BPR-only warm-up undid
        what BPR had learned). In ``none`` mode every parameter is an ID embedding: nothing changes."""
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
    """The paper's fusion: MLP-encoded features concatenated (with the user ID embedding) and projected."""

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
        if mode == "text+profiles":
            self.register_buffer("user_profiles", as_buffer(features.user_profiles))
            self.register_buffer("item_profiles", as_buffer(features.item_profiles))
            self.user_profile_mlp = mlp([features.user_profiles.shape[1], *hidden, out_dim])
            self.item_profile_mlp = mlp([features.item_profiles.shape[1], *hidden, out_dim])
            self.user_merge = nn.Linear(2 * out_dim, out_dim)
            self.item_merge = nn.Linear(2 * out_dim, out_dim)
        self.apply(xavier_init)

    # ------------------------------------------------------------ representations of known ids
    def users(self, index: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.user_id.weight if index is None else self.user_id(index)
        if self.mode != "text+profiles":
            return ids
        profile = self.user_profiles if index is None else self.user_profiles[index]
        return self.merge_user(ids, profile)

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "none":
            return self.item_id.weight if index is None else self.item_id(index)
        text = self.item_text if index is None else self.item_text[index]
        profile = None
        if self.mode == "text+profiles":
            profile = self.item_profiles if index is None else self.item_profiles[index]
        return self.encode_new_items(text, profile)

    # ------------------------------------------------------------ new users / items (serving)
    def merge_user(self, id_part: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.user_merge(torch.cat([id_part, self.user_profile_mlp(profile)], dim=-1)))

    def encode_new_items(self, text: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 representation of items from their text (and profile) embeddings; no ID needed."""
        if self.mode == "none":
            raise ValueError("feature mode 'none' has only item ID embeddings: new items cannot be encoded")
        encoded = self.text_mlp(text)
        if self.mode == "text":
            return encoded
        if profile is None:
            profile = torch.zeros(text.shape[0], self.item_profiles.shape[1], device=text.device)
        return torch.relu(self.item_merge(torch.cat([encoded, self.item_profile_mlp(profile)], dim=-1)))

    def encode_new_users(
        self, id_part: torch.Tensor | None = None, profile: torch.Tensor | None = None, n: int | None = None
    ) -> torch.Tensor:
        """Layer-0 representation of users without a trained ID: ``id_part`` stands in for the ID
        embedding (e.g. the mean of their items' ID-space vectors; zeros when None), and in
        ``text+profiles`` mode the profile embedding is fused in."""
        count = n or (id_part.shape[0] if id_part is not None else profile.shape[0])
        device = self.user_id.weight.device
        if id_part is None:
            id_part = torch.zeros(count, self.out_dim, device=device)
        if self.mode != "text+profiles":
            return id_part
        if profile is None:
            profile = torch.zeros(count, self.user_profiles.shape[1], device=device)
        return self.merge_user(id_part, profile)


FUSIONS: dict[str, type[Fusion]] = {"concat": ConcatFusion}


def build_fusion(
    name: str, n_users: int, n_items: int, out_dim: int, mode: str, features: SideFeatures, config: CFConfig
) -> Fusion:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}: expected one of {sorted(FUSIONS)}")
    return FUSIONS[name](n_users, n_items, out_dim, mode, features, config)
