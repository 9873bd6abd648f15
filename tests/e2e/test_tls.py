"""TLS on the ingress: serve_config.yaml's http_options with ssl_certfile / ssl_keyfile (Ray Serve's own), the
official openai client verifying the server against the CA the test makes. Its own `serve run` and Ray, as an
operator starts it; the tiny model keeps it short."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.serve_process import ROOT, serve_run
from tests.integration.conftest import free_port


def make_ca_and_server_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a server certificate it signs for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("llmaas test CA", ca_key, "llmaas test CA", ca_key, ca=True)
    server = cert("127.0.0.1", server_key, "llmaas test CA", ca_key, ca=False,
                  san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory, tiny_chat_dir):
    import ray

    if ray.is_initialized():
        pytest.fail("run tests/e2e before anything starts a Ray instance in this process")
    tmp = tmp_path_factory.mktemp("tls")
    ca, certfile, keyfile = make_ca_and_server_cert(tmp)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(port=port, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile))
    args = config["applications"][0]["args"]
    args.update(storage_root=str(tmp / "storage"), model={"source": str(tiny_chat_dir), "served_name": "tiny"})
    args["engine"].update(kv_cache_memory_gb=0.05, torch_threads=1)
    url = f"https://127.0.0.1:{port}"
    with serve_run(config, tmp, url, verify=str(ca)):
        yield url, ca, port


def test_the_openai_client_talks_tls_with_verification_on(tls_serve):
    import openai

    url, ca, port = tls_serve
    with httpx.Client(verify=str(ca)) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason is not None
    # a client that does not trust this CA refuses the server; plain HTTP gets no answer from the TLS port
    with httpx.Client() as untrusting:
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=untrusting, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            stranger.models.list()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
