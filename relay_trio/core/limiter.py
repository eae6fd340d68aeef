"""Per-resource leaky bucket, as pure arithmetic on two floats.

The bucket is a meter: its ``level`` drains at ``rate`` per second and each admitted
report adds 1; a report is admitted when the level after draining leaves room for it
under ``burst``. Over any window of length T at most ``burst + rate*T`` reports are
admitted. The state lives in the resource entry (two floats), not in an object per
bucket, so 100k resources cost no more than their table rows.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

# Float noise must not turn an exactly-full bucket into a rejection (or the reverse).
_EPS: Final = 1e-9


@attrs.frozen
class LeakyBucket:
    """Policy shared by every resource: ``rate`` reports per second, ``burst`` capacity."""

    rate: float
    burst: int

    @classmethod
    def per_minute(cls, rate_per_minute: float, burst: int) -> LeakyBucket:
        """A bucket admitting ``rate_per_minute`` reports per minute with ``burst`` capacity."""
        return cls(rate=rate_per_minute / 60.0, burst=burst)

    def drained(self, level: float, last: float, now: float) -> float:
        """The level at ``now`` given ``level`` measured at ``last`` (never negative)."""
        elapsed = now - last
        if elapsed <= 0:
            return level
        return max(0.0, level - elapsed * self.rate)

    def offer(self, level: float, last: float, now: float) -> tuple[bool, float, float]:
        """Decide one arrival at ``now``. Pure; never raises.

        Returns ``(admitted, new_level, retry_after)``. When admitted the new level
        includes this report and ``retry_after`` is 0; otherwise the level is only
        drained and ``retry_after`` is the exact wait until one report fits.
        """
        current = self.drained(level, last, now)
        if current + 1.0 <= self.burst + _EPS:
            return True, current + 1.0, 0.0
        return False, current, (current + 1.0 - self.burst) / self.rate

    def headroom(self, level: float, last: float, now: float) -> float:
        """How many reports would be admitted right now (fractional)."""
        return self.burst - self.drained(level, last, now)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds - _EPS)))
