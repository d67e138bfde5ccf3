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
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

_LOG_SIZE = 5000


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


@dataclass
class Settings:
    """Knobs that are not per route."""

    propagation_seconds: float = 0.0  # before a new or changed credential is accepted
    arm_write_seconds: float = 0.0  # how long an ARM credential write takes (overlaps -> 409)
    token_lifetime_seconds: int = 3599  # access tokens' expires_in (Entra's: about an hour)

    def to_json(self) -> dict[str, Any]:
        return {
            "propagationSeconds": self.propagation_seconds,
            "armWriteSeconds": self.arm_write_seconds,
            "tokenLifetimeSeconds": self.token_lifetime_seconds,
        }


@dataclass
class Controls:
    clock: Clock = field(default_factory=Clock)
    settings: Settings = field(default_factory=Settings)
    latency: dict[str, float] = field(default_factory=dict)  # route pattern -> seconds
    failures: list[InjectedFailure] = field(default_factory=list)
    rate_limits: list[RateLimit] = field(default_factory=list)
    log: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=_LOG_SIZE))
    counts: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        self.clock.skew = 0.0
        self.settings = Settings()
        self.latency.clear()
        self.failures.clear()
        self.rate_limits.clear()
        self.clear_log()

    def clear_log(self) -> None:
        self.log.clear()
        self.counts.clear()

    def set_latency(self, route: str, seconds: float) -> None:
        if seconds <= 0:
            self.latency.pop(route, None)
        else:
            self.latency[route] = seconds

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
            "failures": [asdict(f) for f in self.failures],
            "rateLimits": [r.to_json() for r in self.rate_limits],
        }
