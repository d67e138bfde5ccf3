"""The ``sql:`` section of the sandbox world, resolved against its ``entra:`` section.

``sql.servers[]`` names each emulated server's tenant, its Entra admin (an application name from
``entra.applications``), the app whose identity reads the directory, and its databases with seed
SQL and contained users (``users[].application`` names the app whose client id becomes the SID).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sandbox.azuresql.engine import SeedUser

DEFAULT_WORLD = Path(__file__).resolve().parent.parent / "world.yaml"


class ConfigError(Exception):
    """The world file is missing something the emulator needs; the message names it."""


@dataclass(frozen=True)
class DatabaseSpec:
    name: str
    seed: str
    users: list[SeedUser] = field(default_factory=list)


@dataclass(frozen=True)
class ServerSpec:
    name: str
    tenant: str
    admin_app_id: str
    admin_object_id: str
    reader_app_id: str | None
    reader_secret: str | None
    databases: list[DatabaseSpec]


def load_world(path: Path) -> list[ServerSpec]:
    try:
        world = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the world file {path}: {exc}") from exc
    apps: dict[str, dict[str, Any]] = {
        a["name"]: a for a in (world.get("entra") or {}).get("applications") or []
    }

    def app(name: str, where: str) -> dict[str, Any]:
        if name not in apps:
            raise ConfigError(
                f"{path}: {where} names application {name!r}, which is not in entra.applications"
            )
        return apps[name]

    servers = []
    for raw in (world.get("sql") or {}).get("servers") or []:
        name = raw.get("name")
        if not name or not raw.get("tenant") or not raw.get("entraAdmin"):
            raise ConfigError(f"{path}: every sql.servers entry needs name, tenant and entraAdmin")
        admin = app(raw["entraAdmin"], f"sql server {name!r} entraAdmin")
        reader = (
            app(raw["directoryReader"], f"sql server {name!r} directoryReader")
            if raw.get("directoryReader")
            else None
        )
        databases = []
        for db in raw.get("databases") or []:
            users = []
            for user in db.get("users") or []:
                owner = app(user.get("application") or user["name"], f"database {db['name']!r}")
                users.append(
                    SeedUser(
                        user["name"],
                        uuid.UUID(owner["appId"]).bytes_le,
                        list(user.get("roles") or []),
                    )
                )
            databases.append(DatabaseSpec(db["name"], db.get("seed") or "", users))
        if not databases:
            raise ConfigError(f"{path}: sql server {name!r} has no databases")
        secrets = (reader or {}).get("secrets") or []
        servers.append(
            ServerSpec(
                name=name,
                tenant=raw["tenant"],
                admin_app_id=admin["appId"],
                admin_object_id=admin.get("servicePrincipalObjectId", ""),
                reader_app_id=reader["appId"] if reader else None,
                reader_secret=secrets[0] if secrets else None,
                databases=databases,
            )
        )
    if not servers:
        raise ConfigError(f"{path}: the world has no sql.servers")
    return servers
