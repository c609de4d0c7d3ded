"""Cron schedules: parsing and the pure, clock-free "when does it fire next" step.

Nothing here reads the clock: ``CronSchedule.next_after(t)`` is a pure function of
the schedule and ``t``. That keeps the scheduler testable and lets every process
compute the same fire times.

Grammar: five fields ``minute hour day-of-month month day-of-week``, or six with a
leading ``second`` field when ``seconds=True``. A field is a comma list of ``*``,
``n``, ``a-b``, ``*/n``, ``a-b/n`` or ``a/n`` (``a`` up to the field maximum). Months
accept ``JAN``-``DEC`` and days ``SUN``-``SAT`` (any case); day-of-week is 0-7 with
0 and 7 both Sunday. As in Vixie cron, when both day-of-month and day-of-week are
restricted (neither starts with ``*``) a day matches if EITHER matches; otherwise
both must. Several expressions joined by ``|`` fire at the earliest time of any.

Daylight saving time
--------------------
Fields are matched against the wall clock of the schedule's IANA zone. When the
wall clock jumps, what happens depends on the hour field:

* Hour field matches every hour (``*``, ``*/1``, ``0-23``): the schedule follows
  elapsed time. It fires at every instant whose displayed wall-clock time matches,
  so wall times skipped by a spring-forward gap do not fire (nothing is caught up)
  and wall times repeated by a fall-back overlap fire in both occurrences. Hourly
  ``0 * * * *`` runs 23 times on a spring-forward day and 25 times on a fall-back
  day; ``30 * * * *`` likewise; ``*/15 * * * *`` runs 92 and 100 times.
* Any other hour field (fixed hours, e.g. ``30 2 * * *``): every matching wall-clock
  time fires exactly once. A matching time that does not exist (inside a gap, e.g.
  02:30 on a Europe/Berlin spring-forward day) fires at the instant the gap ends
  (03:00 local); several matching times in one gap, and a match exactly at the gap
  end, fire once together. A matching time that occurs twice (fall-back overlap)
  fires at its first occurrence only. A daily 02:30 job runs once on both days.

The implementation assumes an offset change is never followed by another within
25 hours, which holds for every real zone in the tz database.
"""

from __future__ import annotations

import difflib
from bisect import bisect_left
from functools import lru_cache
from datetime import datetime, timedelta, timezone as _timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError

__all__ = ["CronSchedule", "CronSyntaxError", "TimezoneError", "parse_cron"]


class CronSyntaxError(ConfigurationError):
    """A cron expression is malformed, out of range, or can never fire (a ValueError too)."""


class TimezoneError(ConfigurationError):
    """A timezone name is not a known IANA zone (a ValueError too)."""


_UTC = _timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_TICK = timedelta(microseconds=1)
_SEC, _MIN, _HOUR, _DAY = timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
_WINDOW = timedelta(hours=25)  # larger than any offset change in the tz database
_HORIZON_YEARS = 400  # the Gregorian calendar repeats after 400 years
_MONTHS = {n: i for i, n in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), 1)}
_DAYS = {n: i for i, n in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# name, lowest value, highest value for "*" and "a/n", highest value accepted, names
_FIELDS = (("second", 0, 59, 59, None), ("minute", 0, 59, 59, None), ("hour", 0, 23, 23, None),
           ("day-of-month", 1, 31, 31, None), ("month", 1, 12, 12, _MONTHS), ("day-of-week", 0, 6, 7, _DAYS))


def _ceil(values: tuple[int, ...], v: int) -> int | None:
    """Smallest allowed value >= v, or None: lets the search jump a whole field."""
    i = bisect_left(values, v)
    return values[i] if i < len(values) else None


def _parse_field(expr: str, text: str, name: str, lo: int, wild_hi: int, hi: int,
                 names: dict[str, int] | None) -> tuple[int, ...]:
    def fail(msg: str) -> CronSyntaxError:
        return CronSyntaxError(f"cron {expr!r}: field {name!r} {msg}")

    def value(tok: str) -> int:
        if names and tok.upper() in names:
            return names[tok.upper()]
        if not (tok.isascii() and tok.isdigit()):
            kind = "a number or name" if names else "a number"
            raise fail(f"value {tok!r} is not {kind}")
        if not lo <= int(tok) <= hi:
            raise fail(f"value {int(tok)} is out of range {lo}-{hi}")
        return int(tok)

    out: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise fail(f"step {step_text!r} in {item!r} must be a positive integer")
            step = int(step_text)
        if base == "*":
            start, end = lo, wild_hi
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = value(first), value(last)
            if start > end:
                raise fail(f"range {base!r} is reversed (start > end)")
        elif base:
            start = value(base)
            end = max(start, wild_hi) if slash else start
        else:
            raise fail(f"has an empty item in {text!r}")
        if slash and start < end < start + step:    # */61 in minutes: it would match its start alone
            raise fail(f"step {step} in {item!r} goes past the end of {start}-{end} at once, so it matches "
                       f"{start} alone: write {start} if that is meant")
        out.update(range(start, end + 1, step))
    if name == "day-of-week":
        out = {v % 7 for v in out}  # 7 is Sunday too
    return tuple(sorted(out))


class _Spec:
    """One ``|`` alternative: sorted allowed values per field, and its matching rules."""

    __slots__ = ("second", "minute", "hour", "dom", "month", "dow", "dom_or", "every_hour")

    def __init__(self, expr: str, seconds: bool) -> None:
        parts = expr.split()
        fields = _FIELDS if seconds else _FIELDS[1:]
        if len(parts) != len(fields):
            names = " ".join(f[0] for f in fields)
            hint = " (pass seconds=True for a leading seconds field)" if len(parts) == 6 else ""
            raise CronSyntaxError(
                f"cron {expr!r}: expected {len(fields)} fields ({names}), got {len(parts)}{hint}")
        values = [_parse_field(expr, p, *f) for p, f in zip(parts, fields)]
        if not seconds:
            values.insert(0, (0,))
        self.second, self.minute, self.hour, self.dom, self.month, self.dow = values
        self.dom_or = not (parts[-3].startswith("*") or parts[-1].startswith("*"))
        self.every_hour = len(self.hour) == 24
        if not self.dom_or and not any(d <= _MONTH_DAYS[m - 1] for m in self.month for d in self.dom):
            days = ",".join(map(str, self.dom))  # the AND rule needs a real date; e.g. Feb 31 never is
            raise CronSyntaxError(f"cron {expr!r}: never fires (day-of-month {days} never occurs in its months)")

    def day_ok(self, t: datetime) -> bool:
        dom_ok = t.day in self.dom
        dow_ok = (t.weekday() + 1) % 7 in self.dow  # Python: Monday=0; cron: Sunday=0
        return (dom_ok or dow_ok) if self.dom_or else (dom_ok and dow_ok)

    def next_wall(self, after: datetime, until: datetime | None = None) -> datetime | None:
        """First matching naive wall-clock time strictly after ``after`` (None past ``until``).

        Jumps field by field (month, day, hour, minute, second) instead of
        ticking, so sparse schedules such as Feb 29 cost a few hundred steps.
        """
        t = after.replace(microsecond=0) + _SEC
        if self.second == (0,):
            t = after.replace(second=0, microsecond=0) + _MIN
        limit = t.year + _HORIZON_YEARS
        while True:
            if until is not None and t > until:
                return None
            if t.year > limit:  # unreachable after the parse-time check; a safety net
                raise CronSyntaxError("cron schedule never fires")
            m = _ceil(self.month, t.month)
            if m != t.month:
                t = datetime(t.year, m, 1) if m is not None else datetime(t.year + 1, self.month[0], 1)
                continue
            if not self.day_ok(t):
                t = datetime(t.year, t.month, t.day) + _DAY
                continue
            h = _ceil(self.hour, t.hour)
            if h != t.hour:
                t = (t.replace(hour=h, minute=0, second=0) if h is not None
                     else datetime(t.year, t.month, t.day) + _DAY)
                continue
            mi = _ceil(self.minute, t.minute)
            if mi != t.minute:
                t = t.replace(minute=mi, second=0) if mi is not None else t.replace(minute=0, second=0) + _HOUR
                continue
            s = _ceil(self.second, t.second)
            if s != t.second:
                t = t.replace(second=s) if s is not None else t.replace(second=0) + _MIN
                continue
            return t


def _load_zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise TimezoneError(f"invalid timezone {name!r}: expected an IANA zone name")
    if name == "localtime" or name.startswith(("posix/", "right/")):
        # files of the tz database directory, not zone names: "localtime" is whatever zone each
        # host is set to (producer and workers compute ticks on different hosts), "right/" zones
        # count leap seconds; the zone name itself ("Europe/Berlin") means what is meant
        raise TimezoneError(f"timezone {name!r} is not an IANA zone name: use the zone's own name, "
                            f"such as 'Europe/Berlin' or 'UTC'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise TimezoneError(f"unknown timezone {name!r}: not an IANA zone name{_zone_hint(name)}") from exc


def _zone_hint(name: str) -> str:
    """" (did you mean 'UTC'?)" for a zone name off by case or a letter or two."""
    from zoneinfo import available_timezones

    zones = available_timezones()
    by_case = {z.lower(): z for z in zones}
    close = [by_case[name.lower()]] if name.lower() in by_case else \
        difflib.get_close_matches(name, sorted(zones), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CronSchedule:
    """An immutable cron schedule in an IANA timezone; see the module docstring."""

    __slots__ = ("expression", "timezone", "seconds", "_zone", "_specs")

    expression: str  # whitespace-normalised, alternatives joined by " | "
    timezone: str
    seconds: bool

    def __init__(self, expression: str, timezone: str = "Etc/UTC", *, seconds: bool = False) -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise CronSyntaxError(f"cron {expression!r}: empty expression")
        alternatives = [" ".join(alt.split()) for alt in expression.split("|")]
        if not all(alternatives):
            raise CronSyntaxError(f"cron {expression!r}: empty alternative around '|'")
        self._specs = tuple(_Spec(alt, seconds) for alt in alternatives)
        self._zone = _load_zone(timezone)
        self.expression = " | ".join(alternatives)
        self.timezone = timezone
        self.seconds = bool(seconds)

    @classmethod
    def parse(cls, expression: str, timezone: str = "Etc/UTC", *, seconds: bool = False) -> CronSchedule:
        """Parse ``expression`` in ``timezone``; raises CronSyntaxError / TimezoneError."""
        return cls(expression, timezone, seconds=seconds)

    def next_after(self, t: datetime) -> datetime:
        """First fire time strictly after the aware datetime ``t``, as an aware UTC datetime."""
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError("next_after() needs an aware datetime, got a naive one")
        now = t.astimezone(_UTC).replace(tzinfo=None)
        return min(self._next(spec, now) for spec in self._specs).replace(tzinfo=_UTC)

    def next_after_ms(self, epoch_ms: int) -> int:
        """``next_after`` on Unix epoch milliseconds (fire times are whole seconds)."""
        fire = self.next_after(_EPOCH + timedelta(milliseconds=epoch_ms))
        return (fire - _EPOCH) // timedelta(milliseconds=1)

    # Internals: instants are naive UTC datetimes, wall-clock times naive local ones.

    def _offset_at(self, instant: datetime) -> timedelta:
        return instant.replace(tzinfo=_UTC).astimezone(self._zone).utcoffset()  # type: ignore[return-value]

    def _offset_of(self, wall: datetime, fold: int) -> timedelta:
        return wall.replace(tzinfo=self._zone, fold=fold).utcoffset()  # type: ignore[return-value]

    def _transition(self, lo: datetime, hi: datetime) -> datetime:
        """Instant of the offset change in (lo, hi]; both whole seconds, offsets differ."""
        before = self._offset_at(lo)
        while (n := (hi - lo) // _SEC) > 1:
            mid = lo + _SEC * (n // 2)
            lo, hi = (mid, hi) if self._offset_at(mid) == before else (lo, mid)
        return hi

    def _next(self, spec: _Spec, now: datetime) -> datetime:
        local = now.replace(tzinfo=_UTC).astimezone(self._zone)
        start = local.replace(tzinfo=None)
        if local.fold:  # in the repeated hour: first occurrences are all in the past
            shift = local.replace(fold=0).utcoffset() - local.utcoffset()  # type: ignore[operator]
            floor = now.replace(microsecond=0)
            start = self._transition(floor - shift, floor) + local.replace(fold=0).utcoffset() - _TICK
        best = self._first_occurrence(spec, now, start)
        if spec.every_hour:
            second = self._second_occurrence(spec, now)
            if second is not None and second < best:
                best = second
        return best

    def _first_occurrence(self, spec: _Spec, now: datetime, start: datetime) -> datetime:
        """Earliest fire after ``now`` from a wall time after ``start``, taking each
        repeated wall time at its first occurrence and each skipped one at the gap end.
        This mapping from wall time to instant never goes backwards, so the first
        match that lands after ``now`` is the answer."""
        wall = start
        while True:
            wall = spec.next_wall(wall)  # type: ignore[assignment]
            before, after = self._offset_of(wall, 0), self._offset_of(wall, 1)
            if before < after:  # wall time inside a spring-forward gap
                gap_end = self._transition(wall - after, wall - before)
                if not spec.every_hour and gap_end > now:
                    return gap_end
                wall = gap_end + after - _TICK  # elapsed-time schedules skip the gap
                continue
            if wall - before > now:
                return wall - before

    def _second_occurrence(self, spec: _Spec, now: datetime) -> datetime | None:
        """Earliest fire after ``now`` at the second occurrence of a repeated wall time.
        Only matters within one offset change of ``now``: further away, the first
        occurrence of the same wall time comes earlier and wins."""
        floor = now.replace(microsecond=0)
        found: list[datetime] = []
        for lo, hi in ((floor - _WINDOW, floor), (floor, floor + _WINDOW)):
            before, after = self._offset_at(lo), self._offset_at(hi)
            if before <= after:
                continue
            trans = self._transition(lo, hi)
            end = trans + (before - after)  # second occurrences are the instants [trans, end)
            wall = spec.next_wall(max(now, trans - _TICK) + after, until=end + after)
            if wall is not None and wall - after < end:
                found.append(wall - after)
        return min(found, default=None)

    def __str__(self) -> str:
        return self.expression

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, timezone={self.timezone!r}, seconds={self.seconds})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronSchedule):
            return NotImplemented
        return (self.expression, self.timezone, self.seconds) == (other.expression, other.timezone, other.seconds)

    def __hash__(self) -> int:
        return hash((self.expression, self.timezone, self.seconds))


@lru_cache(maxsize=1024)
def parse_cron(expression: str, timezone: str, seconds: bool) -> CronSchedule:
    """Parsed schedules are immutable, so every tick of a schedule reuses one parse."""
    return CronSchedule(expression, timezone, seconds=seconds)
