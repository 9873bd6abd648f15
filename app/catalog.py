"""What a model name means to the Router: the base model, an adapter alias, or an adapter version."""
from __future__ import annotations

import random

from llmaas.app.errors import NotFound
from llmaas.app.names import BASE_ALIAS
from llmaas.app.protocol import ModelCard
from llmaas.app.registry import AdapterEntry, RegistryState, parse_model_id, resolve


class ModelCatalog:
    """The base model plus a registry snapshot (replaced whole when the registry changes)."""

    def __init__(self, served_name: str, max_model_len: int, state: RegistryState | None = None,
                 rng: random.Random | None = None) -> None:
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.state = state or RegistryState()
        self.rng = rng or random.Random()

    @staticmethod
    def visible(entry: AdapterEntry, tenant: str | None) -> bool:
        """Shared adapters (no owner) are visible to all; a tenant's own only to that tenant (and admins)."""
        return tenant is None or entry.owner is None or entry.owner == tenant

    def resolve(self, model: str, tenant: str | None = None) -> str | None:
        """None for the base model, else the immutable adapter version id to run; 404 if unknown or not yours."""
        if model in (self.served_name, BASE_ALIAS):
            return None
        names = [BASE_ALIAS, self.served_name, *sorted(n for n, e in self.state.adapters.items()
                                                         if self.visible(e, tenant))]
        try:
            name, _ = parse_model_id(model)
            entry = self.state.adapters.get(name)
            if entry is not None and not self.visible(entry, tenant):
                raise NotFound(f"model {model!r} not found", param="model", code="model_not_found")
            return resolve(self.state, model, self.rng)
        except NotFound as exc:
            raise NotFound(f"{exc.message}; available: {', '.join(names)}", param="model",
                           code="model_not_found") from None

    def card(self, model: str, tenant: str | None = None) -> ModelCard:
        """One model's card (GET /v1/models/{id}); 404 for a model this tenant cannot see."""
        for card in self.cards(tenant):
            if card.id == model:
                return card
        raise NotFound(f"model {model!r} not found", param="model", code="model_not_found")

    def cards(self, tenant: str | None = None) -> list[ModelCard]:
        cards = [ModelCard(id=self.served_name, max_model_len=self.max_model_len),
                 ModelCard(id=BASE_ALIAS, max_model_len=self.max_model_len, parent=self.served_name)]
        for name, entry in sorted(self.state.adapters.items()):
            if not self.visible(entry, tenant):
                continue
            if entry.alias is not None or entry.canary:
                cards.append(ModelCard(id=name, parent=self.served_name, max_model_len=self.max_model_len,
                                       alias_of=f"{name}@{entry.alias}" if entry.alias else None,
                                       canary={f"{name}@{v}": s for v, s in (entry.canary or {}).items()} or None))
            for v, ver in sorted(entry.versions.items()):
                cards.append(ModelCard(id=f"{name}@{v}", created=ver.created_at, parent=self.served_name,
                                       max_model_len=self.max_model_len, metadata=ver.metadata))
        return cards
