"""Start-up configuration: defaults, flags over environment, and messages that name the setting."""

from __future__ import annotations

import logging

import pytest
from swi_operator.config import ConfigError, load

TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
CLIENT = "5e0c1d9a-7b3f-4c2e-9a1d-000000000001"
BASE = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT, "AZURE_CLIENT_SECRET": "s3cret"}


def test_defaults_are_azure_public_endpoints():
    config, _ = load([], BASE)
    assert config.authority_host == "https://login.microsoftonline.com"
    assert config.graph_url == "https://graph.microsoft.com/v1.0"
    assert config.arm_url == "https://management.azure.com"
    assert config.authority_is_public
    assert config.namespaces == () and config.peering is None and config.issuer is None
    assert config.drift_interval == 600 and config.posting_level == logging.INFO


def test_environment_and_flags():
    env = {
        **BASE,
        "SWI_GRAPH_URL": "https://localhost:8443/v1.0/",
        "SWI_NAMESPACES": "a, b",
        "SWI_DRIFT_INTERVAL": "5",
        "AZURE_AUTHORITY_HOST": "https://localhost:8443",
    }
    config, _ = load(
        ["--drift-interval", "2.5", "--peering", "swi", "--posting-level", "warning"], env
    )
    assert config.graph_url == "https://localhost:8443/v1.0"
    assert config.namespaces == ("a", "b")
    assert config.drift_interval == 2.5  # the flag wins
    assert config.peering == "swi"
    assert config.posting_level == logging.WARNING
    assert not config.authority_is_public
    flags, _ = load(["--namespace", "x", "--namespace", "y"], env)
    assert flags.namespaces == ("x", "y")


def test_secret_is_never_shown():
    config, _ = load([], BASE)
    assert "s3cret" not in repr(config.redacted())


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (
            [],
            {"AZURE_CLIENT_ID": CLIENT, "AZURE_CLIENT_SECRET": "x"},
            "--tenant-id / AZURE_TENANT_ID",
        ),
        ([], {**BASE, "AZURE_CLIENT_ID": "nope"}, "--client-id / AZURE_CLIENT_ID"),
        ([], {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT}, "AZURE_CLIENT_SECRET"),
        (
            ["--federated-token-file", "/nonexistent"],
            {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT},
            "--federated-token-file",
        ),
        (["--graph-url", "http://graph"], BASE, "--graph-url / SWI_GRAPH_URL"),
        (["--issuer", "issuer"], BASE, "--issuer / SWI_ISSUER"),
        (["--drift-interval", "0"], BASE, "--drift-interval / SWI_DRIFT_INTERVAL"),
        (["--drift-interval", "soon"], BASE, "--drift-interval / SWI_DRIFT_INTERVAL"),
        (["--namespace", "Bad_NS"], BASE, "--namespace / SWI_NAMESPACES"),
        (["--posting-level", "LOUD"], BASE, "--posting-level / SWI_POSTING_LEVEL"),
        (["--ca-bundle", "/nonexistent.pem"], BASE, "--ca-bundle / SWI_CA_BUNDLE"),
        (["--subscription-id", "sub"], BASE, "--subscription-id / AZURE_SUBSCRIPTION_ID"),
        (["--metrics-port", "70000"], BASE, "--metrics-port / SWI_METRICS_PORT"),
        (["--metrics-port", "80.5"], BASE, "--metrics-port / SWI_METRICS_PORT"),
        (
            ["--metrics-port", "8080", "--liveness", "http://0.0.0.0:8080/healthz"],
            BASE,
            "--metrics-port / SWI_METRICS_PORT 8080 is the port of --liveness / SWI_LIVENESS",
        ),
        (
            ["--metrics-port", "8081", "--readiness", "http://0.0.0.0:8081/readyz"],
            BASE,
            "--metrics-port / SWI_METRICS_PORT 8081 is the port of --readiness / SWI_READINESS",
        ),
        (["--metrics-address", "any"], BASE, "--metrics-address / SWI_METRICS_ADDRESS"),
        (["--log-format", "xml"], BASE, "--log-format / SWI_LOG_FORMAT"),
        (
            ["--azure-environment", "AzureCloud", "--injection-webhook", "true"],
            BASE,
            "--azure-environment / AZURE_ENVIRONMENT: 'AzureCloud' names no Azure cloud: "
            "expected one of AzurePublicCloud, AzureChinaCloud",
        ),
        (
            [],
            {**BASE, "AZURE_ENVIRONMENT": "AzureStackCloud", "SWI_INJECTION_WEBHOOK": "true"},
            "--azure-environment / AZURE_ENVIRONMENT: AzureStackCloud reads "
            "AZURE_ENVIRONMENT_FILEPATH, which is not set",
        ),
    ],
)
def test_bad_settings_are_named(argv, env, named):
    with pytest.raises(ConfigError, match=named.replace("/", "/")):
        load(argv, env)


def test_secret_and_token_file_together_are_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text("jwt")
    with pytest.raises(ConfigError, match="only one operator credential"):
        load(["--federated-token-file", str(token)], BASE)
    env = {k: v for k, v in BASE.items() if k != "AZURE_CLIENT_SECRET"}
    config, _ = load(["--federated-token-file", str(token)], env)
    assert config.federated_token_file == token and config.client_secret is None


def test_metrics_and_log_format_settings():
    config, _ = load([], BASE)
    assert (config.metrics_port, config.metrics_address, config.log_format) == (
        0,
        "0.0.0.0",
        "text",
    )
    assert config.redacted()["metrics"] == "(off)"
    env = {**BASE, "SWI_METRICS_PORT": "9090", "SWI_LOG_FORMAT": "JSON"}
    config, _ = load(["--metrics-address", "127.0.0.1"], env)
    assert (config.metrics_port, config.metrics_address, config.log_format) == (
        9090,
        "127.0.0.1",
        "json",
    )
    assert config.redacted()["metrics"] == "127.0.0.1:9090"


def test_azure_environment_is_optional_and_a_flag_wins():
    config, _ = load([], BASE)
    assert config.azure_environment is None
    env = {**BASE, "AZURE_ENVIRONMENT": "AzurePublicCloud"}
    config, _ = load(["--azure-environment", "azurechinacloud", "--injection-webhook", "true"], env)
    assert config.azure_environment == "azurechinacloud"
    # Without the injection webhook nothing reads it, so an unknown name stops nothing.
    config, _ = load([], {**BASE, "AZURE_ENVIRONMENT": "AzureCloud"})
    assert not config.injection_webhook


def test_version_is_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        load(["--version"], BASE)
    assert exited.value.code == 0
    expected = metadata.version("sql-workload-identity-operator")
    assert capsys.readouterr().out.strip() == f"swi-operator {expected}"
