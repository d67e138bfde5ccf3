"""Test controls: injected latency and failures, propagation delay, clock skew, request log.

Every request the router matches has a route name such as ``login.token``, ``graph.fic.create`` or
``arm.fic.put`` (docs/entra-emulator.md lists them). Before the handler runs, the router asks
``Controls.before`` for an injected delay and failure for that name; patterns in the controls are
shell-style (``graph.*``), so one rule can cover a whole surface. After the handler, ``record``
appends the outcome to a bounded request log and to per-route counts, which tests and benchmarks
read through the admin API.

``Clock`` is the emulator's notion of "now": wall time plus an injected skew. Issued tokens and
the validation of client assertions both use it, so skew tests look exactly like a client whose
clock is off.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

_LOG_SIZE = 5000
V = TypeVar("V")


class Clock:
    """Wall-clock time shifted by ``skew`` seconds, for everything a token's time claims touch.

    Ages of federated credentials (the propagation delay) are measured on ``real()`` time: a
    skewed clock must not make a credential created a second ago look an hour old or young.
    """

    def __init__(self) -> None:
        self.skew = 0.0

    def now(self) -> float:
        return time.time() + self.skew

    @staticmethod
    def real() -> float:
        return time.time()


@dataclass
class InjectedFailure:
    """The next ``remaining`` matching calls are answered with ``status`` instead of running."""

    route: str
    status: int
    remaining: int
    retry_after: float | None = None


@dataclass
class RateLimit:
    """A token bucket per target (or one for all): ``rate`` calls/s refilled, ``burst`` deep.

    Models Azure's write quotas: e.g. ``arm.fic.put`` at 0.25/s per managed identity, or
    ``graph.fic.*`` at 20/s per app (shared/docs/scale.md).
    """

    route: str
    rate: float
    burst: float
    per_target: bool = True
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def take(self, target: str, now: float) -> float:
        """Take one token; returns 0 if granted, else the seconds until one is available."""
        key = target.lower() if self.per_target else ""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "rate": self.rate,
            "burst": self.burst,
            "perTarget": self.per_target,
        }


@dataclass
class RequestRecord:
    at: float
    route: str
    method: str
    path: str
    status: int
    ms: float
    injected: bool = False
    delay_ms: float = 0.0  # the injected latency (fixed part plus jitter) this call waited


@dataclass
class Settings:
    """Knobs that are not per route."""

    propagation_seconds: float = 0.0  # before a new or changed credential is accepted
    arm_write_seconds: float = 0.0  # how long an ARM credential write takes (overlaps -> 409)
    graph_read_lag_seconds: float = 0.0  # how long Graph reads miss a write (replica lag)
    token_lifetime_seconds: int = 3599  # access tokens' expires_in (Entra's: about an hour)

    def to_json(self) -> dict[str, Any]:
        return {
            "propagationSeconds": self.propagation_seconds,
            "armWriteSeconds": self.arm_write_seconds,
            "graphReadLagSeconds": self.graph_read_lag_seconds,
            "tokenLifetimeSeconds": self.token_lifetime_seconds,
        }


class ReadLag(Generic[V]):
    """Graph's read-after-write lag: reads served by a replica that is ``lag`` seconds behind.

    Writes always go to the primary (so a create of a name the primary has is refused, even while
    reads do not show it yet). Each write to a keyed collection is remembered with the value it
    replaced; a lagging read starts from the primary's state and undoes, newest first, every
    write younger than the lag. So for ``lag`` seconds a created item is missing, a deleted one
    is still listed and an updated one shows its old value, then all of them converge.
    """

    def __init__(self) -> None:
        # collection -> [(when, item key, value before the write or None)], oldest first
        self._writes: dict[str, list[tuple[float, str, V | None]]] = {}

    def clear(self) -> None:
        self._writes.clear()

    def wrote(self, collection: str, key: str, before: V | None, now: float) -> None:
        self._writes.setdefault(collection, []).append((now, key, before))

    def view(self, collection: str, current: dict[str, V], lag: float, now: float) -> dict[str, V]:
        """What a replica ``lag`` seconds behind shows of ``current``."""
        writes = self._writes.get(collection)
        if not writes:
            return current
        horizon = now - max(lag, 0.0)
        # Writes the slowest replica has seen no longer matter: forget them.
        while writes and writes[0][0] <= horizon:
            writes.pop(0)
        seen = dict(current)
        for _when, key, before in reversed(writes):
            if before is None:
                seen.pop(key, None)
            else:
                seen[key] = before
        return seen


@dataclass
class Controls:
    clock: Clock = field(default_factory=Clock)
    settings: Settings = field(default_factory=Settings)
    latency: dict[str, float] = field(default_factory=dict)  # route pattern -> seconds
    jitter: dict[str, float] = field(default_factory=dict)  # route pattern -> up to +seconds
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failures: list[InjectedFailure] = field(default_factory=list)
    rate_limits: list[RateLimit] = field(default_factory=list)
    log: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=_LOG_SIZE))
    counts: Counter[str] = field(default_factory=Counter)
    read_lag: ReadLag[Any] = field(default_factory=ReadLag)

    def reset(self) -> None:
        self.clock.skew = 0.0
        self.settings = Settings()
        self.read_lag.clear()
        self.latency.clear()
        self.jitter.clear()
        self.failures.clear()
        self.rate_limits.clear()
        self.clear_log()

    def clear_log(self) -> None:
        self.log.clear()
        self.counts.clear()

    def set_latency(self, route: str, seconds: float, jitter: float = 0.0) -> None:
        """Delay matching calls by ``seconds`` plus a uniform draw from ``[0, jitter]``."""
        for table, value in ((self.latency, seconds), (self.jitter, jitter)):
            if value <= 0:
                table.pop(route, None)
            else:
                table[route] = value

    def fail_next(
        self, route: str, status: int, count: int, retry_after: float | None = None
    ) -> None:
        self.failures.append(InjectedFailure(route, status, count, retry_after))

    def set_rate_limit(self, route: str, rate: float, burst: float, per_target: bool) -> None:
        self.rate_limits = [r for r in self.rate_limits if r.route != route]
        if rate > 0:
            self.rate_limits.append(RateLimit(route, rate, max(burst, 1.0), per_target))

    def before(self, route: str, target: str) -> tuple[float, InjectedFailure | None]:
        """The delay to apply and the failure to inject, if any.

        An injected failure consumes one of its calls; otherwise a rate limit over quota turns
        into a 429 whose ``Retry-After`` is the wait for the next token. ``target`` is the object
        the call addresses (a managed identity or an application), the unit of Azure's quotas.
        """
        delay = sum(s for pattern, s in self.latency.items() if fnmatch.fnmatchcase(route, pattern))
        delay += sum(
            self.rng.uniform(0.0, s)
            for pattern, s in self.jitter.items()
            if fnmatch.fnmatchcase(route, pattern)
        )
        for failure in self.failures:
            if failure.remaining > 0 and fnmatch.fnmatchcase(route, failure.route):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self.failures.remove(failure)
                return delay, failure
        now = time.monotonic()
        for limit in self.rate_limits:
            if fnmatch.fnmatchcase(route, limit.route):
                wait = limit.take(target, now)
                if wait > 0:
                    return delay, InjectedFailure(route, 429, 0, wait)
        return delay, None

    def record(self, record: RequestRecord) -> None:
        self.log.append(record)
        self.counts[record.route] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "clockSkewSeconds": self.clock.skew,
            **self.settings.to_json(),
            "latency": dict(self.latency),
            "jitter": dict(self.jitter),
            "failures": [asdict(f) for f in self.failures],
            "rateLimits": [r.to_json() for r in self.rate_limits],
        }
