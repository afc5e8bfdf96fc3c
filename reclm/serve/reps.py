"""Representations a trained CF model scores with, for known users and items and for new ones.

Known nodes come straight from the model (``final_embeddings`` for dot-product backbones, the fusion's
layer-0 representations for NCF, which scores pairs with its towers). New nodes are built with the fusion's
``encode_new_items`` / ``encode_new_users`` and then given what the backbone adds on top:

- LightGCN, SGL, SimGCL: a new item has no edges, so its propagated layers are zero and its final
  representation is its layer-0 one divided by ``layers + 1``: exactly how the trained model treats a
  zero-shot item. A new user is *folded in*: it is linked to its history items and propagated, layer by
  layer, over the items' layers of the trained graph (``u_k = sum_i x_i^(k-1) / sqrt(|H| (d_i + 1))``,
  from what the graph propagates: layer 0, or under the ``local`` fusion layer 0 without the profile
  corrections); the effect of the new user on its items' own layers is left out.
- BiasMF: ``[p_u, 1] . [q_i, b_i]``, the item bias from the model's bias head.
- NCF: layer-0 representations, scored by the model's towers.

A new user's layer-0 ID part, which a trained user has as an ID embedding, is the mean ID embedding of the
trained users who share its history items, weighted by how many they share (``id_strategy="users"``). On the
tiny test run that put a history's genre in the top 5 for every backbone, while the mean of the history
items' layer-0 representations (``"items"``) or zeros did so only for LightGCN (whose fold-in layers carry the
history anyway); ``benchmarks/serve_load.py --cold`` compares them on ml-100k. The profile embedding is fused
in as in training (text+profiles).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from reclm.cf.backbones.base import CFModel
from reclm.cf.backbones.biasmf import BiasMF
from reclm.cf.backbones.lightgcn import LightGCN
from reclm.cf.backbones.ncf import NeuMF
from reclm.cf.graph import propagate

NCF_CHUNK_PAIRS = 1 << 16
ID_STRATEGIES = ("users", "items", "zeros")  # (user, item) pairs through NCF's towers at once


def as_tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class ServingModel:
    """A trained CF model seen from the server: matrices of known nodes, and encoders for new ones."""

    def __init__(self, model: CFModel, train: np.ndarray, n_users: int, n_items: int, id_strategy: str = "users"):
        if id_strategy not in ID_STRATEGIES:
            raise ValueError(f"id strategy {id_strategy!r}: expected one of {', '.join(ID_STRATEGIES)}")
        self.model = model.eval()
        if isinstance(model, LightGCN):
            self.kind = "graph"
        elif isinstance(model, BiasMF):
            self.kind = "bias"
        elif isinstance(model, NeuMF):
            self.kind = "ncf"
        else:
            raise ValueError(f"serving does not know how to build new users for backbone {model.name!r}")
        self.fusion = model.fusion
        self.mode = model.fusion.mode
        self.n_users, self.n_items = n_users, n_items
        with torch.no_grad():
            if self.kind == "graph":  # a folded-in user reads what the graph propagates
                users0, items0, start = self.fusion.graph_layer0()
                users0, items0 = start or (users0, items0)
            else:
                users0, items0 = self.fusion.all()
            self.items0 = items0.numpy().astype(np.float32)
            if self.kind == "ncf":
                self.users_final, self.items_final = users0.numpy(), self.items0
            else:
                users, items = model.final_embeddings()
                self.users_final, self.items_final = users.numpy(), items.numpy()
            self.item_layers = self.graph_item_layers(users0, items0) if self.kind == "graph" else []
        pairs = np.unique(np.asarray(train, dtype=np.int64), axis=0)
        self.item_degree = np.bincount(pairs[:, 1], minlength=n_items).astype(np.float32)
        values = np.ones(len(pairs), np.float32)
        self.train_matrix = sp.csr_matrix((values, (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
        self.id_strategy = id_strategy

    # ------------------------------------------------------------ what the model can take
    @property
    def dot_product(self) -> bool:
        return self.kind != "ncf"

    @property
    def uses_profiles(self) -> bool:
        return self.fusion_profile("user") is not None or self.fusion_profile("item") is not None

    def fusion_profile(self, side: str):
        """The fusion's profile input of ``side`` (None when the mode does not use that side's profiles)."""
        return getattr(self.fusion, f"{side}_profile", None)

    @property
    def takes_new_items(self) -> bool:
        return self.mode != "none"

    @property
    def text_dim(self) -> int | None:
        return None if self.mode == "none" else int(self.fusion.item_text.shape[1])

    @property
    def profile_dims(self) -> tuple[int, int] | None:
        """(user, item) profile embedding sizes in text+profiles mode."""
        if not self.uses_profiles:
            return None
        user, item = self.fusion_profile("user"), self.fusion_profile("item")
        return (user.dim if user is not None else None), (item.dim if item is not None else None)

    def item_text_vectors(self) -> np.ndarray | None:
        """The item text embeddings the model was trained with (a buffer of its fusion module)."""
        return None if self.mode == "none" else self.fusion.item_text.numpy()

    # ------------------------------------------------------------ graph layers of the trained model
    def graph_item_layers(self, users0: torch.Tensor, items0: torch.Tensor) -> list[np.ndarray]:
        """Item rows of propagation layers ``0 .. L-1`` of the full train graph (what a folded-in user reads),
        from what the graph propagates (``users0``, ``items0``)."""
        x = torch.cat([users0, items0], dim=0)
        layers = []
        for _ in range(self.model.config.layers):
            layers.append(x[self.n_users :].numpy().astype(np.float32))
            x = propagate(self.model.adjacency, x)
        return layers

    # ------------------------------------------------------------ new items
    @torch.no_grad()
    def new_items(self, text: np.ndarray, profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(``items0`` rows, final representations) of items from their text (and profile) embeddings; the
        first are what ``self.items0`` holds for trained items (graph backbones: what the graph propagates)."""
        if not self.takes_new_items:
            raise ValueError("this model has only item ID embeddings (feature mode 'none'): it cannot take new items")
        text, profile = as_tensor(text), as_tensor(profile if self.uses_profiles else None)
        if self.kind == "graph":
            items0, rows = self.fusion.encode_new_items_for_graph(text, profile)
        else:
            items0 = rows = self.fusion.encode_new_items(text, profile)
        return rows.numpy().astype(np.float32), self.final_of_new_items(items0).numpy().astype(np.float32)

    def final_of_new_items(self, items0: torch.Tensor) -> torch.Tensor:
        if self.kind == "graph":
            return items0 / (self.model.config.layers + 1) if self.fusion.propagates_items else items0
        if self.kind == "bias":
            return torch.cat([items0, self.model.biases(items0, None).unsqueeze(1)], dim=1)
        return items0

    # ------------------------------------------------------------ new users
    @torch.no_grad()
    def new_users(
        self, histories: list[np.ndarray], items0: np.ndarray, profiles: np.ndarray | None = None
    ) -> np.ndarray:
        """Final representations of users known only by their history items (indices into ``items0``, the
        catalog's layer-0 item matrix, which may hold items added after training) and profile embeddings."""
        if any(len(h) == 0 for h in histories):
            raise ValueError("a new user needs at least one history item")
        rows = history_matrix(histories, len(items0))
        counts = np.asarray(rows.sum(axis=1)).ravel()
        id_part = self.id_part(rows, items0, counts)
        profile = as_tensor(profiles) if self.uses_profiles and profiles is not None else None
        users0 = self.fusion.encode_new_users(as_tensor(id_part), profile, n=len(histories)).numpy()
        if self.kind == "graph":
            return self.fold_in(users0, rows, counts, items0)
        if self.kind == "bias":
            return np.concatenate([users0, np.ones((len(users0), 1), np.float32)], axis=1)
        return users0.astype(np.float32)

    def id_part(self, rows: sp.csr_matrix, items0: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """What stands in for a new user's ID embedding (see ``self.id_strategy``)."""
        if self.id_strategy == "items":
            return np.asarray((sp.diags(1.0 / counts) @ rows) @ items0, dtype=np.float32)
        if self.id_strategy == "zeros":
            return np.zeros((rows.shape[0], self.fusion.out_dim), np.float32)
        # "users": trained users' ID embeddings, weighted by how many of the history's items they share
        shared = rows[:, : self.n_items] @ self.train_matrix.T  # (new users, trained users)
        weight = np.asarray(shared.sum(axis=1)).ravel()
        ids = self.fusion.user_id.weight.detach().numpy()
        mean_id = ids.mean(axis=0, keepdims=True)
        out = np.asarray(sp.diags(1.0 / np.maximum(weight, 1.0)) @ shared @ ids, dtype=np.float32)
        out[weight == 0] = mean_id  # only items nobody trained on: the average user
        return out

    def fold_in(self, users0: np.ndarray, rows: sp.csr_matrix, counts: np.ndarray, items0: np.ndarray) -> np.ndarray:
        """LightGCN layers of users linked to their history items (see the module docstring)."""
        degree = np.zeros(rows.shape[1], np.float32)
        degree[: self.n_items] = self.item_degree
        weights = rows.multiply(1.0 / np.sqrt(counts)[:, None]).multiply(1.0 / np.sqrt(degree + 1.0)[None, :])
        weights = sp.csr_matrix(weights)
        total = users0.astype(np.float32).copy()
        for k in range(self.model.config.layers):
            layer = items0 if k == 0 else self.padded_layer(k, rows.shape[1])
            total += weights @ layer
        return (total / (self.model.config.layers + 1)).astype(np.float32)

    def padded_layer(self, k: int, n_catalog: int) -> np.ndarray:
        """Layer ``k`` of the trained items, with zero rows for items added since (they have no edges)."""
        layer = self.item_layers[k]
        if n_catalog == len(layer):
            return layer
        return np.concatenate([layer, np.zeros((n_catalog - len(layer), layer.shape[1]), np.float32)])

    # ------------------------------------------------------------ NCF scoring
    @torch.no_grad()
    def ncf_scores(self, user: np.ndarray, items: np.ndarray) -> np.ndarray:
        """NCF scores of one user representation against item representations, through the model's towers."""
        u = as_tensor(user).reshape(1, -1)
        out = np.empty(len(items), np.float32)
        for start in range(0, len(items), NCF_CHUNK_PAIRS):
            block = as_tensor(items[start : start + NCF_CHUNK_PAIRS])
            out[start : start + len(block)] = self.model.pair_scores(u.expand(len(block), -1), block).numpy()
        return out


def history_matrix(histories: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Binary (users, items) matrix of the histories (duplicates count once)."""
    rows = np.concatenate([np.full(len(h), r) for r, h in enumerate(histories)])
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    matrix = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix
