"""Who may call: TLS with a bearer token or a client certificate, against a real
`python -m agent serve`, with real clients (aiohttp, requests, tritonclient); secrets rotate
without a restart."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from structlog.testing import capture_logs

from agent.serving.auth import (
    AuthSettings,
    Credentials,
    SecretError,
    bearer_token,
    parse_tokens,
)
from tests.support.agent_process import AgentProcess, running_agent
from tests.support.artifact_server import cert_name, write_pem_pair
from tests.support.models import TINY_FEATURES, tiny_bytes

TOKEN = "t0ken-" + "a" * 20
NEW_TOKEN = "t0ken-" + "b" * 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{TOKEN}\n", {TOKEN}),
        (f"# rotated monthly\n\n {TOKEN} \n{NEW_TOKEN}\n", {TOKEN, NEW_TOKEN}),
    ],
)
def test_parse_tokens(text: str, expected: set[str]) -> None:
    assert parse_tokens(text) == expected


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n\n"])
def test_a_token_file_without_tokens_lists_none(text: str) -> None:
    """How every token is revoked at once."""
    assert parse_tokens(text) == frozenset()


@pytest.mark.parametrize("text", ["short\n", "x" * 20 + "\x00\n"])
def test_unusable_token_files_are_refused(text: str) -> None:
    with pytest.raises(SecretError):
        parse_tokens(text)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"Bearer {TOKEN}", TOKEN),
        (f"bearer {TOKEN}", TOKEN),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    "values",
    [
        {"api_token_file": "/t"},  # a token over plain HTTP
        {"tls_client_ca_file": "/ca"},
        {"tls_cert_file": "/c"},  # without its key
    ],
)
def test_inconsistent_auth_settings_are_refused(values: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        AuthSettings.model_validate(values)


# --- a PKI made for the test: CA, server certificate, client certificate --------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    ca_key: ec.EllipticCurvePrivateKey

    def issue(self, directory: Path, stem: str, *, server: bool) -> tuple[Path, Path]:
        return _issue(directory, stem, self.ca_key, server=server)


def _issue(
    directory: Path, stem: str, ca_key: ec.EllipticCurvePrivateKey, *, server: bool
) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert_name("localhost" if server else "sensor-module"))
        .issuer_name(cert_name("auth test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return write_pem_pair(directory, stem, builder.sign(ca_key, hashes.SHA256()), key)


def make_pki(directory: Path) -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(cert_name("auth test CA"))
        .issuer_name(cert_name("auth test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca_path,
        _issue(directory, "server", ca_key, server=True),
        _issue(directory, "client", ca_key, server=False),
        ca_key,
    )


# --- the reload rule, on real files ----------------------------------------------------------


@dataclass
class Loaded:
    credentials: Credentials
    registry: CollectorRegistry
    token_file: Path
    cert: Path

    @property
    def failed(self) -> float | None:
        return self.registry.get_sample_value("agent_secrets_failed")

    def reload(self) -> list[MutableMapping[str, Any]]:
        with capture_logs() as logs:
            self.credentials.reload_if_changed()
        return logs


@pytest.fixture
def loaded(tmp_path: Path) -> Loaded:
    pki = make_pki(tmp_path)
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    settings = AuthSettings(
        tls_cert_file=pki.server[0],
        tls_key_file=pki.server[1],
        api_token_file=token_file,
    )
    registry = CollectorRegistry()
    return Loaded(Credentials(settings, registry=registry), registry, token_file, pki.server[0])


def _replace(path: Path, text: str) -> None:
    """As a secret mount does: a new file (a new inode) renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.replace(path)


@pytest.mark.parametrize("text", ["", "\n", "# revoked 2026-12-08\n"])
def test_an_emptied_token_file_revokes_every_token_without_a_failure(
    loaded: Loaded, text: str
) -> None:
    loaded.token_file.write_text(text)
    logs = loaded.reload()
    assert loaded.credentials.tokens == frozenset()
    assert loaded.failed == 0
    assert [e["event"] for e in logs] == ["secrets_reloaded"]


def test_a_deleted_token_file_fails_closed_is_reported_and_recreating_it_restores(
    loaded: Loaded,
) -> None:
    loaded.token_file.unlink()
    logs = loaded.reload()
    assert loaded.credentials.tokens == frozenset()
    assert loaded.failed == 1
    [event] = logs
    assert event["event"] == "secrets_reload_failed"
    assert event["file"] == str(loaded.token_file)
    assert "No such file" in event["error"]
    assert loaded.reload() == []  # still missing: reported once, not on every tick
    _replace(loaded.token_file, NEW_TOKEN + "\n")
    assert [e["event"] for e in loaded.reload()] == ["secrets_reloaded"]
    assert loaded.credentials.tokens == {NEW_TOKEN}
    assert loaded.failed == 0


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda p: (p.unlink(), p.mkdir()), id="a-directory"),  # unreadable as root
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe" * 20), id="not-text"),
        pytest.param(lambda p: p.write_text("short\n"), id="malformed"),
    ],
)
def test_an_unreadable_or_malformed_token_file_fails_closed(loaded: Loaded, break_it: Any) -> None:
    break_it(loaded.token_file)
    [event] = loaded.reload()
    assert event["event"] == "secrets_reload_failed"
    assert loaded.credentials.tokens == frozenset()
    assert loaded.failed == 1


def test_a_missing_certificate_keeps_the_last_good_one_and_is_reported(loaded: Loaded) -> None:
    context = loaded.credentials.ssl_context
    loaded.cert.unlink()
    [event] = loaded.reload()
    assert event["event"] == "secrets_reload_failed"
    assert event["consequence"] == "last good certificate kept"
    assert loaded.credentials.ssl_context is context
    assert loaded.credentials.tokens == {TOKEN}  # the token file did not change
    assert loaded.failed == 1


# --- against the real process --------------------------------------------------------------


@dataclass(frozen=True)
class Secured:
    agent: AgentProcess
    pki: Pki
    token_file: Path
    directory: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.agent.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"https://127.0.0.1:{self.agent.ports['metrics']}/metrics"

    def context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if client_cert:
            context.load_cert_chain(*map(str, self.pki.client))
        return context


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    directory = tmp_path_factory.mktemp("auth")
    pki = make_pki(directory)
    token_file = directory / "tokens"
    token_file.write_text(TOKEN + "\n")
    model = directory / "tiny.onnx"
    model.write_bytes(tiny_bytes(0))
    # Secrets are mounted files: the agent reads copies the test can rotate in place.
    cert, key = directory / "serving.crt", directory / "serving.key"
    cert.write_bytes(pki.server[0].read_bytes())
    key.write_bytes(pki.server[1].read_bytes())
    env = {
        "EDGEML_TLS_CERT_FILE": str(cert),
        "EDGEML_TLS_KEY_FILE": str(key),
        "EDGEML_TLS_CLIENT_CA_FILE": str(pki.ca),
        "EDGEML_API_TOKEN_FILE": str(token_file),
        "EDGEML_SECRETS_RELOAD_S": "0.2",
    }
    with running_agent(model, "--name", "m", env=env) as agent:
        yield Secured(agent, pki, token_file, directory)


def _body() -> dict[str, Any]:
    data = [0.25] * TINY_FEATURES
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, TINY_FEATURES], "data": data}]
    }


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _post(secured: Secured, *, token: str | None = None, client_cert: bool = False) -> int:
    connector = aiohttp.TCPConnector(ssl=secured.context(client_cert=client_cert))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"{secured.url}/v2/models/m/infer",
            json=_body(),
            headers=_auth(token) if token else {},
        ) as response,
    ):
        await response.read()
        return response.status


def _unauthorized(secured: Secured) -> float:
    text = requests.get(
        secured.metrics_url, headers=_auth(TOKEN), verify=str(secured.pki.ca), timeout=10
    ).text
    found = re.search(r'agent_inference_rejections_total\{reason="unauthorized"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


pytestmark = pytest.mark.e2e


async def test_health_is_open_and_everything_else_needs_a_token_or_a_certificate(
    secured: Secured,
) -> None:
    connector = aiohttp.TCPConnector(ssl=secured.context())
    async with aiohttp.ClientSession(connector=connector) as session:
        for path in ("/v2/health/live", "/v2/health/ready"):
            async with session.get(secured.url + path) as response:
                assert response.status == 200
        async with session.get(secured.url + "/v2/models/m") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "authentication required" in (await response.json())["error"]
    before = await asyncio.to_thread(_unauthorized, secured)
    assert await _post(secured) == 401
    assert await _post(secured, token="t0ken-" + "c" * 20) == 401
    assert await asyncio.to_thread(_unauthorized, secured) == before + 2
    assert await _post(secured, token=TOKEN) == 200
    assert await _post(secured, client_cert=True) == 200


def test_requests_with_a_token_and_the_metrics_port_behind_the_same_door(
    secured: Secured,
) -> None:
    verify = str(secured.pki.ca)
    url = f"{secured.url}/v2/models/m/infer"
    assert requests.post(url, json=_body(), verify=verify, timeout=10).status_code == 401
    answer = requests.post(url, json=_body(), headers=_auth(TOKEN), verify=verify, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["name"] == "output"
    assert requests.get(secured.metrics_url, verify=verify, timeout=10).status_code == 401
    # Plain HTTP on the TLS port gets nowhere.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(secured.url.replace("https", "http") + "/v2/health/live", timeout=5)


def test_tritonclient_with_a_token_header(secured: Secured) -> None:
    client = httpclient.InferenceServerClient(
        secured.url.removeprefix("https://"),
        ssl=True,
        ssl_options={"ca_certs": str(secured.pki.ca)},
    )
    try:
        x = np.full((2, TINY_FEATURES), 0.5, dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        assert client.is_server_live()
        result = client.infer("m", [tensor], headers=_auth(TOKEN))
        assert result.as_numpy("output").shape[0] == 2
        with pytest.raises(Exception, match="authentication required"):
            client.infer("m", [tensor])
    finally:
        client.close()


def _served_serial(secured: Secured) -> int:
    with (
        socket.create_connection(("127.0.0.1", secured.agent.ports["http"]), timeout=5) as raw,
        secured.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _eventually(check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the rotated secret never took effect"
        time.sleep(0.1)


def test_secrets_rotate_without_a_restart(secured: Secured) -> None:
    verify = str(secured.pki.ca)
    url = f"{secured.url}/v2/models/m/infer"

    def status(token: str) -> int:
        return requests.post(
            url, json=_body(), headers=_auth(token), verify=verify, timeout=10
        ).status_code

    pid = secured.agent.process.pid
    secured.token_file.write_text(NEW_TOKEN + "\n")
    _eventually(lambda: status(NEW_TOKEN) == 200 and status(TOKEN) == 401)
    # A new server certificate (same CA): new handshakes present it.
    old_serial = _served_serial(secured)
    cert, key = secured.pki.issue(secured.directory, "rotated", server=True)
    # The key first, then the certificate, each replaced whole (as a secret mount does).
    (secured.directory / "serving.key").write_bytes(key.read_bytes())
    (secured.directory / "serving.crt").write_bytes(cert.read_bytes())
    new_serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    _eventually(lambda: _served_serial(secured) == new_serial)
    assert new_serial != old_serial
    assert status(NEW_TOKEN) == 200
    assert secured.agent.process.pid == pid
    assert secured.agent.process.poll() is None
    secured.token_file.write_text(TOKEN + "\n")  # as the other tests expect
    _eventually(lambda: status(TOKEN) == 200)


def test_json_error_body(secured: Secured) -> None:
    answer = requests.get(f"{secured.url}/v2", verify=str(secured.pki.ca), timeout=10)
    assert answer.status_code == 401
    assert set(json.loads(answer.text)) == {"error"}


def test_emptying_or_deleting_the_token_file_revokes_every_token_until_it_is_back(
    secured: Secured,
) -> None:
    verify = str(secured.pki.ca)
    url = f"{secured.url}/v2/models/m/infer"

    def status(token: str = TOKEN) -> int:
        return requests.post(
            url, json=_body(), headers=_auth(token), verify=verify, timeout=10
        ).status_code

    def health() -> int:
        return requests.get(f"{secured.url}/v2/health/live", verify=verify, timeout=10).status_code

    def secrets_failed() -> float:
        # The token is revoked: the metrics port is read with the client certificate.
        text = requests.get(
            secured.metrics_url,
            verify=verify,
            cert=(str(secured.pki.client[0]), str(secured.pki.client[1])),
            timeout=10,
        ).text
        found = re.search(r"^agent_secrets_failed (\S+)$", text, re.MULTILINE)
        assert found is not None, "agent_secrets_failed is not exported"
        return float(found.group(1))

    assert status() == 200
    secured.token_file.write_text("# all revoked\n")
    _eventually(lambda: status() == 401)
    assert health() == 200
    assert secrets_failed() == 0
    secured.token_file.write_text(TOKEN + "\n")
    _eventually(lambda: status() == 200)
    secured.token_file.unlink()
    _eventually(lambda: status() == 401)
    assert health() == 200
    assert secrets_failed() == 1
    assert secured.agent.events("secrets_reload_failed")
    secured.token_file.write_text(TOKEN + "\n")  # recreated: access is back, no restart
    _eventually(lambda: status() == 200)
    assert secrets_failed() == 0
    assert secured.agent.process.poll() is None
