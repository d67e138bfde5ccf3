"""The ledger: what the operator made, kept where no namespace tenant writes.

A resource's status says what its reconciles did, but status is lost with the resource (``Retain``
then delete, the finalizer stripped) and the sweep must not trust it anyway. So before the operator
creates a database user, grants a role, or creates a federated credential on an identity, it
writes that down in one ConfigMap of its own namespace (``--ledger-namespace``; the shipped roles
give namespace teams nothing there):

* ``id.<hash>``: an identity it federated (the string status records: an app's client id or a
  managed identity's resource id). The sweep lists the credentials of every one of them, also
  after a restart (issue 18: the sweep used to know only the identities seen since it started);
* ``db.<hash>``: a database user it created, or roles it granted to a user that existed before,
  for one resource (namespace, name, uid, identity, server, database, client id, user name,
  created, granted roles). The entry is written *before* the statement (so a crash between the
  ``CREATE USER`` and the status write loses nothing) and removed once the user is dropped or the
  roles revoked. The sweep drops what no live, allowed resource backs (``sweep.py``).

Merge patches of the changed keys only: writers never conflict, and replicas and operators of
other namespaces (``SWI_NAMESPACES``) share it; each acts only on entries of the namespaces it
serves.

Kept in 16 ConfigMaps, not one (``SHARDS``: ``<name>-0`` to ``<name>-f``, a key's shard the first
hex digit of its hash). A ConfigMap is written whole: every patch of one ledger made the API server
decode, store and send back the entire map, so onboarding N resources cost O(N^2) bytes, and at
about 3,000 resources it would pass a ConfigMap's 1 MiB limit. One shard holds a sixteenth, and
writes that arrive while a shard's patch is in flight go together in its next patch (group
commit: each writer still returns only once its key is stored). The single ConfigMap of earlier
versions (``<name>``) is read too and its entries moved into the shards on the first read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from swi_operator.policy import server_key
from swi_operator.spec import IdentityRef
from swi_operator.sql import SqlTarget
from swi_operator.steps.federation import identity_from_status, identity_key

LEDGER_NAME = "sql-workload-identity-operator-ledger"


class LedgerStore(Protocol):
    """Where the ledger lives (a ConfigMap: ``kube.KubernetesClient``)."""

    async def read_ledger(self) -> dict[str, str]: ...

    async def patch_ledger(self, changes: Mapping[str, str | None]) -> None: ...


class MemoryLedgerStore:
    """A ledger in memory: unit tests, and the steps built without a cluster."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def read_ledger(self) -> dict[str, str]:
        return dict(self.data)

    async def patch_ledger(self, changes: Mapping[str, str | None]) -> None:
        for key, value in changes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class UserEntry:
    """A database user the operator created (``created``), or roles it granted to one."""

    namespace: str
    resource: str
    uid: str
    identity: str  # as status records it: federation.identity_key
    server: str
    database: str
    client_id: str
    user: str
    created: bool
    granted_roles: tuple[str, ...] = ()
    # Its resource let it go (deleted, revoked) while another cluster was federated with the
    # identity: the sweep undoes it once none is, whatever retention the policies allow.
    released: bool = False

    @property
    def target(self) -> SqlTarget:
        return SqlTarget(self.server, self.database)

    @property
    def user_key(self) -> tuple[str, str, str]:
        """The database user itself, however the server is spelled: (server, database, SID)."""
        key = server_key(self.server)
        server = f"{key.host},{key.port}" if key else self.server.lower()
        return server, self.database, self.client_id.lower()

    @property
    def key(self) -> str:
        return "db." + _digest(self.uid, *self.user_key)

    @property
    def identity_ref(self) -> IdentityRef | None:
        return identity_from_status(self.identity)

    def to_json(self) -> str:
        fields: dict[str, object] = {
            "namespace": self.namespace,
            "resource": self.resource,
            "uid": self.uid,
            "identity": self.identity,
            "server": self.server,
            "database": self.database,
            "clientId": self.client_id,
            "user": self.user,
            "created": self.created,
            "grantedRoles": sorted(self.granted_roles),
        }
        if self.released:  # absent otherwise: entries written before it read the same
            fields["released"] = True
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UserEntry | None:
        try:
            raw = json.loads(text)
            entry = cls(
                namespace=str(raw["namespace"]),
                resource=str(raw["resource"]),
                uid=str(raw["uid"]),
                identity=str(raw["identity"]),
                server=str(raw["server"]),
                database=str(raw["database"]),
                client_id=str(raw["clientId"]),
                user=str(raw["user"]),
                created=bool(raw["created"]),
                granted_roles=tuple(str(r) for r in raw.get("grantedRoles") or ()),
                released=raw.get("released") is True,
            )
        except (ValueError, KeyError, TypeError):
            return None
        return entry if server_key(entry.server) is not None else None


class Ledger:
    """The ledger through a cache: read once, then every write goes through it; ``refresh``
    reads it again (the sweep does, before each pass)."""

    def __init__(self, store: LedgerStore) -> None:
        self._store = store
        self._data: dict[str, str] | None = None
        self._lock = asyncio.Lock()

    async def _loaded(self) -> dict[str, str]:
        if self._data is None:
            async with self._lock:
                if self._data is None:
                    self._data = await self._store.read_ledger()
        return self._data

    async def refresh(self) -> None:
        data = await self._store.read_ledger()
        async with self._lock:
            self._data = data

    async def _set(self, key: str, value: str | None) -> None:
        data = await self._loaded()
        if data.get(key) == value:
            return
        await self._store.patch_ledger({key: value})
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value

    async def remember_identity(self, ref: IdentityRef) -> None:
        await self._set("id." + _digest(ref.key), identity_key(ref))

    async def forget_identity(self, ref: IdentityRef) -> None:
        await self._set("id." + _digest(ref.key), None)

    async def identities(self) -> list[IdentityRef]:
        data = await self._loaded()
        found = (identity_from_status(v) for k, v in data.items() if k.startswith("id."))
        return [ref for ref in found if ref is not None]

    async def users(self) -> list[UserEntry]:
        data = await self._loaded()
        found = (UserEntry.from_json(v) for k, v in data.items() if k.startswith("db."))
        return [entry for entry in found if entry is not None]

    async def user(self, key: str) -> UserEntry | None:
        value = (await self._loaded()).get(key)
        return UserEntry.from_json(value) if value is not None else None

    async def put_user(self, entry: UserEntry) -> None:
        await self._set(entry.key, entry.to_json())

    async def remove_user(self, entry: UserEntry) -> None:
        await self._set(entry.key, None)


SHARDS = tuple("0123456789abcdef")


def shard_of(key: str) -> str:
    """The shard a ledger key lives in: the first hex digit of its hash (keys are
    ``<kind>.<hex digest>``); anything else (a key written by hand) in shard 0."""
    _, _, digest = key.partition(".")
    first = digest[:1].lower()
    return first if first in SHARDS else SHARDS[0]


class _ShardWriter:
    """Group commit for one ConfigMap: changes that arrive while a patch is in flight are sent
    together in the next one; each caller returns when the patch holding its change is done."""

    def __init__(self, patch: Callable[[Mapping[str, str | None]], Awaitable[None]]) -> None:
        self._patch = patch
        self._pending: dict[str, str | None] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def write(self, changes: Mapping[str, str | None]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.update(changes)  # a later value of the same key wins, as it would in order
        self._waiters.append(done)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="swi-ledger-write")
        await asyncio.shield(done)  # a caller's cancellation does not cancel the others' write

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, waiters = self._pending, self._waiters
                self._pending, self._waiters = {}, []
                try:
                    await self._patch(batch)
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._task = None


class ConfigMapLedgerStore:
    """The ledger as the ConfigMaps ``<name>-0`` .. ``<name>-f`` of the operator's namespace
    (and, until its entries are moved, the single ``<name>`` of earlier versions)."""

    def __init__(self, kube: ConfigMaps, namespace: str, name: str = LEDGER_NAME) -> None:
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self._writers = {
            shard: _ShardWriter(functools.partial(self._patch_shard, shard)) for shard in SHARDS
        }

    def shard_name(self, shard: str) -> str:
        return f"{self.name}-{shard}"

    async def _patch_shard(self, shard: str, changes: Mapping[str, str | None]) -> None:
        await self._kube.patch_config_map(self.namespace, self.shard_name(shard), changes)

    async def read_ledger(self) -> dict[str, str]:
        names = [self.name, *(self.shard_name(shard) for shard in SHARDS)]
        legacy, *shards = await asyncio.gather(
            *(self._kube.read_config_map(self.namespace, name) for name in names)
        )
        data: dict[str, str] = {}
        for found in shards:
            data.update(found or {})
        if legacy:
            # An earlier version's single ConfigMap: its entries into the shards, then out of it
            # (a crash in between leaves them in both, which reads the same).
            await self.patch_ledger(legacy)
            await self._kube.patch_config_map(self.namespace, self.name, dict.fromkeys(legacy))
            data.update(legacy)
        return data

    async def patch_ledger(self, changes: Mapping[str, str | None]) -> None:
        by_shard: dict[str, dict[str, str | None]] = {}
        for key, value in changes.items():
            by_shard.setdefault(shard_of(key), {})[key] = value
        await asyncio.gather(
            *(self._writers[shard].write(part) for shard, part in by_shard.items())
        )


class ConfigMaps(Protocol):
    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...

    async def patch_config_map(
        self, namespace: str, name: str, changes: Mapping[str, str | None]
    ) -> None: ...
