"""What a model name means to the Router: the base model, an adapter alias, or an adapter version."""
from __future__ import annotations

import random

from llmaas.app.errors import NotFound
from llmaas.app.protocol import ModelCard
from llmaas.app.registry import RegistryState, resolve

BASE_ALIAS = "base"


class ModelCatalog:
    """The base model plus a registry snapshot (replaced whole when the registry changes)."""

    def __init__(self, served_name: str, max_model_len: int, state: RegistryState | None = None,
                 rng: random.Random | None = None) -> None:
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.state = state or RegistryState()
        self.rng = rng or random.Random()

    def resolve(self, model: str) -> str | None:
        """None for the base model, else the immutable adapter version id to run; 404 if unknown."""
        if model in (self.served_name, BASE_ALIAS):
            return None
        try:
            return resolve(self.state, model, self.rng)
        except NotFound as exc:
            names = [BASE_ALIAS, self.served_name, *sorted(self.state.adapters)]
            raise NotFound(f"{exc.message}; available: {', '.join(names)}", param="model",
                           code="model_not_found") from None

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.served_name, max_model_len=self.max_model_len),
                 ModelCard(id=BASE_ALIAS, max_model_len=self.max_model_len, parent=self.served_name)]
        for name, entry in sorted(self.state.adapters.items()):
            if entry.alias is not None or entry.canary:
                cards.append(ModelCard(id=name, parent=self.served_name, max_model_len=self.max_model_len,
                                       alias_of=f"{name}@{entry.alias}" if entry.alias else None,
                                       canary={f"{name}@{v}": s for v, s in (entry.canary or {}).items()} or None))
            for v, ver in sorted(entry.versions.items()):
                cards.append(ModelCard(id=f"{name}@{v}", created=ver.created_at, parent=self.served_name,
                                       max_model_len=self.max_model_len, metadata=ver.metadata))
        return cards
