"""The webhook server's certificate: when it is renewed, how a renewed one is served, TLS 1.3.

The server here is the real one (``build_server``: kopf's WebhookServer with our SSL context and
``InjectionServer`` around it) in provided-certificate mode on a local port, with no
configuration to manage; the sandbox tests (tests/injection/test_webhook_upkeep.py) run the
self-managed mode and the configurations through the API server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from kubernetes.client import ApiClient
from swi_operator import webhooks
from swi_operator.webhooks import (
    TlsBundle,
    WebhookConfigError,
    WebhookSettings,
    WebhookState,
    _new_ca,
    _new_ca_keeping_old,
    build_server,
    bundle_trusts,
    client_config_in_line,
    issue_bundle,
    needs_reissue,
    parse_duration,
    renewal_due,
    write_tls_files,
)

NOW = dt.datetime(2026, 12, 4, 3, 0, tzinfo=dt.UTC)
NAMES = ["localhost"]
IPS = ["127.0.0.1"]


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("40", 40),
        ("40s", 40),
        ("15m", 900),
        ("12h", 43200),
        ("365d", 365 * 86400),
        (" 2D ", 172800),
    ],
)
def test_durations(raw: str, seconds: int) -> None:
    assert parse_duration("X", raw, dt.timedelta(0)).total_seconds() == seconds


@pytest.mark.parametrize("raw", ["0", "-5s", "1y", "1.5h", "soon", "10 s"])
def test_bad_durations_name_the_variable(raw: str) -> None:
    with pytest.raises(WebhookConfigError, match="SWI_WEBHOOK_CERT_VALIDITY must be a positive"):
        WebhookSettings.from_env({"SWI_WEBHOOK_CERT_VALIDITY": raw})


def test_defaults_a_year_renewed_with_30_days_left() -> None:
    settings = WebhookSettings.from_env({})
    assert settings.cert_validity == dt.timedelta(days=365)
    assert settings.renew_before == dt.timedelta(days=30)
    assert settings.tls_check_interval == 60.0  # a minute apart at most


def test_short_lived_settings_for_tests() -> None:
    settings = WebhookSettings.from_env(
        {"SWI_WEBHOOK_CERT_VALIDITY": "30s", "SWI_WEBHOOK_CERT_RENEW_BEFORE": "15s"}
    )
    assert (settings.cert_validity, settings.renew_before) == (
        dt.timedelta(seconds=30),
        dt.timedelta(seconds=15),
    )
    assert settings.tls_check_interval == 3.75  # four checks inside the renewal window


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SWI_WEBHOOK_CERT_VALIDITY": "30s", "SWI_WEBHOOK_CERT_RENEW_BEFORE": "30s"},
            "SWI_WEBHOOK_CERT_RENEW_BEFORE .* must be shorter than SWI_WEBHOOK_CERT_VALIDITY",
        ),
        ({"SWI_WEBHOOK_CERT_RENEW_BEFORE": "400d"}, "must be shorter than"),
        ({"SWI_WEBHOOK_CERT_VALIDITY": "5s"}, "SWI_WEBHOOK_CERT_VALIDITY must be between 10s"),
        ({"SWI_WEBHOOK_CERT_VALIDITY": "3000d"}, "and 1825d"),
        ({"SWI_WEBHOOK_CERT_RENEW_BEFORE": "later"}, "SWI_WEBHOOK_CERT_RENEW_BEFORE must be"),
    ],
)
def test_bad_validity_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookConfigError, match=message):
        WebhookSettings.from_env(env)


# --- the renewal decision ------------------------------------------------------------------------


def test_renewal_due_inside_the_window_only() -> None:
    window = dt.timedelta(seconds=15)
    expires = NOW + dt.timedelta(seconds=20)
    assert not renewal_due(expires, NOW, window)
    assert not renewal_due(expires, NOW + dt.timedelta(seconds=5), window)  # exactly 15 s left
    assert renewal_due(expires, NOW + dt.timedelta(seconds=6), window)
    assert renewal_due(expires, NOW + dt.timedelta(seconds=60), window)  # expired


def test_a_short_lived_certificate_is_reissued_after_half_its_life() -> None:
    validity, window = dt.timedelta(seconds=30), dt.timedelta(seconds=15)
    bundle = issue_bundle(NAMES, IPS, now=NOW, validity=validity)
    cert = x509.load_pem_x509_certificate(bundle.tls_crt)
    assert cert.not_valid_after_utc == NOW + validity
    assert not needs_reissue(bundle, NAMES, IPS, NOW + dt.timedelta(seconds=14), window)
    assert needs_reissue(bundle, NAMES, IPS, NOW + dt.timedelta(seconds=16), window)
    # A name the API server will dial that the certificate lacks: re-issued whatever is left.
    assert needs_reissue(bundle, [*NAMES, "other.svc"], IPS, NOW, window)
    # The default window (30 days) renews a year-long certificate after 335 days.
    year = issue_bundle(NAMES, IPS, now=NOW)
    assert not needs_reissue(year, NAMES, IPS, NOW + dt.timedelta(days=334))
    assert needs_reissue(year, NAMES, IPS, NOW + dt.timedelta(days=336))


def test_a_certificate_never_outlives_its_ca() -> None:
    ca = _new_ca(NOW - dt.timedelta(days=3650 - 10))  # ten days left
    bundle = issue_bundle(NAMES, IPS, ca=ca, now=NOW)
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    assert x509.load_pem_x509_certificate(bundle.tls_crt).not_valid_after_utc == (
        ca_cert.not_valid_after_utc
    )


def test_a_new_ca_keeps_the_old_one_in_the_bundle_while_it_is_valid() -> None:
    old = issue_bundle(NAMES, IPS, now=NOW)
    ca_crt, ca_key = _new_ca_keeping_old(old, NOW)
    renewed = issue_bundle(NAMES, IPS, ca=(ca_crt, ca_key), now=NOW)
    bundle = x509.load_pem_x509_certificates(renewed.ca_crt)
    assert len(bundle) == 2
    assert bundle[1].public_bytes(serialization.Encoding.PEM) == old.ca_crt
    # The new certificate is signed by the new CA (the first of the bundle), not the old one.
    served = x509.load_pem_x509_certificate(renewed.tls_crt)
    served.verify_directly_issued_by(bundle[0])
    with pytest.raises(InvalidSignature):
        served.verify_directly_issued_by(bundle[1])
    # An expired old CA is dropped.
    later = NOW + dt.timedelta(days=3651)
    assert len(x509.load_pem_x509_certificates(_new_ca_keeping_old(old, later)[0])) == 1


# --- whether a configuration is in line --------------------------------------------------------


def _b64(pem: bytes) -> str:
    return base64.b64encode(pem).decode()


def test_a_bundle_trusts_by_signature_not_by_name() -> None:
    ours = issue_bundle(NAMES, IPS, now=NOW)
    other = issue_bundle(NAMES, IPS, now=NOW)  # another CA with the very same subject name
    assert bundle_trusts(_b64(ours.ca_crt), ours.tls_crt)
    assert not bundle_trusts(_b64(other.ca_crt), ours.tls_crt)
    assert bundle_trusts(_b64(other.ca_crt + ours.ca_crt), ours.tls_crt)  # new next to old
    assert bundle_trusts(_b64(ours.tls_crt), ours.tls_crt)  # no ca.crt: the certificate itself
    assert not bundle_trusts(None, ours.tls_crt)
    assert not bundle_trusts("", ours.tls_crt)
    assert not bundle_trusts(_b64(b"not a certificate"), ours.tls_crt)


def test_which_client_configs_are_restored() -> None:
    ours = issue_bundle(NAMES, IPS, now=NOW)
    rolled = _new_ca_keeping_old(ours, NOW)[0]  # another replica's new CA, next to ours
    stale = issue_bundle(NAMES, IPS, now=NOW).ca_crt  # an old manifest's baked-in bundle
    service = {"caBundle": _b64(ours.ca_crt)}
    url = {"caBundle": _b64(ours.ca_crt), "url": "https://localhost:9443/inject-workload-identity"}
    svc_ref = {"name": "x", "namespace": "y"}
    cases = [
        ({}, service, False),  # re-created from the manifest: no caBundle
        ({"caBundle": _b64(ours.ca_crt), "service": svc_ref}, service, True),
        ({"caBundle": _b64(rolled), "service": svc_ref}, service, True),  # left to the other
        ({"caBundle": _b64(stale), "service": svc_ref}, service, False),
        ({"caBundle": _b64(ours.ca_crt), "service": svc_ref}, url, False),  # sandbox: url
        ({"caBundle": _b64(ours.ca_crt), "url": url["url"]}, url, True),
        ({"caBundle": _b64(ours.ca_crt), "url": "https://elsewhere/"}, url, False),
    ]
    for live, wanted, in_line in cases:
        assert client_config_in_line(live, wanted, ours.tls_crt) is in_line, (live, wanted)


# --- the live server -----------------------------------------------------------------------------


async def _served_serial(port: int, context: ssl.SSLContext | None = None) -> int:
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def _no_review(*_: Any, **__: Any) -> Any:
    raise AssertionError("no admission review is sent in these tests")


@pytest.fixture
async def provided_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[int, Path, TlsBundle]]:
    """The webhook server on a local port, serving the files in ``tmp_path`` (provided mode)."""
    monkeypatch.setattr(webhooks, "TLS_FILE_CHECK_INTERVAL_S", 0.2)
    first = issue_bundle(NAMES, IPS, now=dt.datetime.now(dt.UTC))
    write_tls_files(first, tmp_path)
    settings = WebhookSettings(
        addr="127.0.0.1",
        port=0,
        tls_dir=tmp_path,
        configuration=None,  # nothing to patch: no API server here
        url_host="127.0.0.1",
        config_check_interval=0.2,
    )
    api = ApiClient()
    state = WebhookState(settings, api)
    server = build_server(settings, api, state)
    generator = cast(AsyncGenerator[Any, None], server(_no_review))
    kopf_config = await generator.__anext__()
    port = int(str(kopf_config["url"]).rsplit(":", 1)[1].split("/")[0])
    upkeep = server.task
    assert upkeep is not None and not upkeep.done()  # the upkeep runs while the server does
    try:
        yield port, tmp_path, first
    finally:
        await generator.aclose()
        assert upkeep.cancelled()  # and stops with it
        api.close()  # type: ignore[no-untyped-call]


def _client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    return context


async def test_tls_1_2_is_refused_and_1_3_answers(
    provided_server: tuple[int, Path, TlsBundle],
) -> None:
    port, _, first = provided_server
    # The server answers a TLS 1.2 ClientHello with a protocol_version alert, or resets.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _served_serial(port, _client(ssl.TLSVersion.TLSv1_2))
    assert await _served_serial(port, _client(ssl.TLSVersion.TLSv1_3)) == (
        x509.load_pem_x509_certificate(first.tls_crt).serial_number
    )


async def test_renewed_files_are_served_without_closing_the_port(
    provided_server: tuple[int, Path, TlsBundle],
) -> None:
    """cert-manager renews the mounted Secret: the next handshakes get the new certificate, and
    handshakes made all along never fail (the port stays open: no server restart)."""
    port, folder, first = provided_server
    old = x509.load_pem_x509_certificate(first.tls_crt).serial_number
    seen: list[int] = []
    stop = asyncio.Event()

    async def handshakes() -> None:
        while not stop.is_set():
            seen.append(await _served_serial(port))  # raises if the port refuses
            await asyncio.sleep(0.02)

    running = asyncio.create_task(handshakes())
    await asyncio.sleep(0.3)
    renewed = issue_bundle(NAMES, IPS, ca=(first.ca_crt, first.ca_key))
    write_tls_files(renewed, folder)
    new = x509.load_pem_x509_certificate(renewed.tls_crt).serial_number
    for _ in range(100):
        if seen and seen[-1] == new:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    stop.set()
    await running
    assert seen[0] == old
    assert seen[-1] == new
    # Once the new one is served, only the new one is.
    assert set(seen[seen.index(new) :]) == {new}


async def test_a_mismatched_pair_keeps_the_old_certificate(
    provided_server: tuple[int, Path, TlsBundle],
) -> None:
    port, folder, first = provided_server
    other = issue_bundle(NAMES, IPS, ca=(first.ca_crt, first.ca_key))
    (folder / "tls.crt").write_bytes(other.tls_crt)  # the key stays the old one: no pair
    await asyncio.sleep(0.6)
    assert await _served_serial(port) == x509.load_pem_x509_certificate(first.tls_crt).serial_number
    (folder / "tls.key").write_bytes(other.tls_key)  # the rest of the update arrives
    for _ in range(40):
        if (
            await _served_serial(port)
            == x509.load_pem_x509_certificate(other.tls_crt).serial_number
        ):
            break
        await asyncio.sleep(0.1)
    assert await _served_serial(port) == x509.load_pem_x509_certificate(other.tls_crt).serial_number


def test_the_operator_refuses_bad_webhook_settings_before_it_connects(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from swi_operator.__main__ import main

    monkeypatch.setenv("AZURE_TENANT_ID", "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10")
    monkeypatch.setenv("AZURE_CLIENT_ID", "5e0c1d9a-7b3f-4c2e-9a1d-000000000001")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("SWI_WEBHOOK_CERT_VALIDITY", "20s")
    monkeypatch.setenv("SWI_WEBHOOK_CERT_RENEW_BEFORE", "1m")
    assert main(["--policy-webhook", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SWI_WEBHOOK_CERT_RENEW_BEFORE (0:01:00) must be shorter than")


async def test_the_upkeep_outlives_a_failed_check_and_logs_it_once(
    provided_server: tuple[int, Path, TlsBundle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swi_operator.webhooks")
    port, folder, first = provided_server
    (folder / "tls.key").unlink()  # a mount gone for a while
    await asyncio.sleep(1.0)  # five checks
    failures = [r for r in caplog.records if "certificate check failed" in r.getMessage()]
    assert len(failures) == 1
    assert "FileNotFoundError" in failures[0].getMessage()
    renewed = issue_bundle(NAMES, IPS, ca=(first.ca_crt, first.ca_key))
    write_tls_files(renewed, folder)
    serial = x509.load_pem_x509_certificate(renewed.tls_crt).serial_number
    for _ in range(40):
        if await _served_serial(port) == serial:
            break
        await asyncio.sleep(0.1)
    assert await _served_serial(port) == serial
    await asyncio.sleep(0.3)  # the log lines follow the switch
    messages = [r.getMessage() for r in caplog.records]
    assert f"serving the renewed webhook certificate (serial {serial:x})" in messages
    assert "the webhook certificate check works again" in messages
