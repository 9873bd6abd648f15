"""Runtime API keys (digests only, revocation) and the append-only audit log, on real storage."""
from __future__ import annotations

import time

import pytest

from llmaas.app.access import AuditLog, CreateKeyRequest, KeyStore
from llmaas.app.auth import APIKey, Authenticator, key_digest
from llmaas.app.errors import NotFound, Unauthorized


def test_a_key_is_shown_once_stored_as_a_digest_and_revoked_for_good(tmp_path):
    store = KeyStore(tmp_path)
    record, secret = store.create(CreateKeyRequest(tenant="acme", name="ci"), created_by="ops")
    stored = b"".join((tmp_path / k).read_bytes() for k in store.storage.list("access-keys"))
    assert secret.encode() not in stored and key_digest(secret).hex().encode() in stored
    assert "digest" not in record.model_dump() and record.redacted == "..." + secret[-4:]
    state = store.load()
    assert [k.id for k in state.active()] == [record.id] and state.generation == 1

    auth = Authenticator([APIKey(key="config-admin-key-0001", tenant="ops", admin=True)])
    auth.set_runtime_keys(state.generation, [(k.digest, k.tenant, k.admin, k.id) for k in state.active()])
    who = auth.authenticate(f"Bearer {secret}")
    assert (who.tenant, who.admin, who.key_id) == ("acme", False, record.id)
    assert auth.authenticate("Bearer config-admin-key-0001").admin

    store.revoke(record.id)
    state = store.load()
    assert state.active() == [] and state.keys[0].revoked_at is not None  # still listed, for the audit trail
    auth.set_runtime_keys(state.generation, [])
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {secret}")
    auth.set_runtime_keys(1, [(record.digest, "acme", False, record.id)])  # a late, older answer changes nothing
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {secret}")
    with pytest.raises(NotFound):
        store.revoke("key-nope")


def test_the_audit_log_only_ever_adds_and_reads_newest_first(tmp_path):
    log = AuditLog(tmp_path)
    t0 = time.time()
    for i in range(5):
        log.append("adapter.promote", "ops", target=f"a@{i}")
    log.append("auth.refused", None, target="/v1/models", outcome="invalid_api_key")
    events = log.read()
    assert [e.target for e in events] == ["/v1/models", "a@4", "a@3", "a@2", "a@1", "a@0"]
    assert [e.target for e in log.read(limit=2)] == ["/v1/models", "a@4"]
    assert log.read(start=time.time() + 1) == [] and len(log.read(start=t0 - 1, end=time.time() + 1)) == 6
    assert len(log.storage.list("audit")) == 6  # one immutable object per event
