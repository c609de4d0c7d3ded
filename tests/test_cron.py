"""Tests for coretask.cron: parsing, field matching and the DST rules (pure, no clock)."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from coretask.cron import CronSchedule, CronSyntaxError, TimezoneError

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires_between(schedule: CronSchedule, start: datetime, end: datetime) -> list[datetime]:
    """All fire times in [start, end), by chaining next_after."""
    out: list[datetime] = []
    t = schedule.next_after(start - timedelta(microseconds=1))
    while t < end:
        out.append(t)
        t = schedule.next_after(t)
    return out


def local_day(tz: str, day: date) -> tuple[datetime, datetime]:
    """The instants at which the local calendar day ``day`` starts and ends."""
    zone = ZoneInfo(tz)
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    nxt = day + timedelta(days=1)
    return start.astimezone(UTC), datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).astimezone(UTC)


def fires_on_day(expr: str, tz: str, day: date, **kw: bool) -> list[datetime]:
    return fires_between(CronSchedule.parse(expr, tz, **kw), *local_day(tz, day))


def next_local(expr: str, tz: str, after: datetime, **kw: bool) -> datetime:
    """next_after, shown as naive local wall time (handy for readable assertions)."""
    return CronSchedule.parse(expr, tz, **kw).next_after(after).astimezone(ZoneInfo(tz)).replace(tzinfo=None)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("expr", "seconds", "message"),
    [
        ("61 * * * *", False, "cron '61 * * * *': field 'minute' value 61 is out of range 0-59"),
        ("0 24 * * *", False, "field 'hour' value 24 is out of range 0-23"),
        ("0 0 0 * *", False, "field 'day-of-month' value 0 is out of range 1-31"),
        ("0 0 32 * *", False, "field 'day-of-month' value 32 is out of range 1-31"),
        ("0 0 * 13 *", False, "field 'month' value 13 is out of range 1-12"),
        ("0 0 * * 8", False, "field 'day-of-week' value 8 is out of range 0-7"),
        ("60 * * * * *", True, "field 'second' value 60 is out of range 0-59"),
        ("0 0 * FOO *", False, "field 'month' value 'FOO' is not a number or name"),
        ("0 0 * * FUNDAY", False, "field 'day-of-week' value 'FUNDAY' is not a number or name"),
        ("x * * * *", False, "field 'minute' value 'x' is not a number"),
        ("JAN * * * *", False, "field 'minute' value 'JAN' is not a number"),
        ("-1 * * * *", False, "field 'minute' value '' is not a number"),
        ("*/0 * * * *", False, "field 'minute' step '0' in '*/0' must be a positive integer"),
        ("0 */x * * *", False, "field 'hour' step 'x' in '*/x' must be a positive integer"),
        ("*/61 * * * *", False, "field 'minute' step 61 in '*/61' goes past the end of 0-59 at once, so it "
                                "matches 0 alone: write 0 if that is meant"),
        ("10-20/15 * * * *", False, "step 15 in '10-20/15' goes past the end of 10-20 at once"),
        ("0 5-3 * * *", False, "field 'hour' range '5-3' is reversed"),
        ("0 0 1,,2 * *", False, "field 'day-of-month' has an empty item"),
        ("0 0 * * SAT-SUN", False, "field 'day-of-week' range 'SAT-SUN' is reversed"),
    ],
)
def test_field_errors_name_the_field(expr: str, seconds: bool, message: str) -> None:
    with pytest.raises(CronSyntaxError) as info:
        CronSchedule.parse(expr, seconds=seconds)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_field_count_says_how_many_were_expected() -> None:
    with pytest.raises(CronSyntaxError, match=r"expected 5 fields \(minute hour day-of-month month "
                                              r"day-of-week\), got 4"):
        CronSchedule.parse("* * * *")
    with pytest.raises(CronSyntaxError, match="expected 5 fields.*got 6.*seconds=True"):
        CronSchedule.parse("* * * * * *")
    with pytest.raises(CronSyntaxError, match=r"expected 6 fields \(second minute .*\), got 5"):
        CronSchedule.parse("* * * * *", seconds=True)
    with pytest.raises(CronSyntaxError, match="empty expression"):
        CronSchedule.parse("   ")
    with pytest.raises(CronSyntaxError, match="empty alternative"):
        CronSchedule.parse("0 * * * * |")


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 FEB */2"])
def test_impossible_date_never_fires(expr: str) -> None:
    with pytest.raises(CronSyntaxError, match="never fires"):
        CronSchedule.parse(expr)


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../etc/passwd", "/etc/localtime", "Europe", 5,
                                  "localtime", "posix/Europe/Berlin", "right/UTC"])
def test_invalid_timezone(name: object) -> None:
    with pytest.raises(TimezoneError) as info:
        CronSchedule.parse("* * * * *", name)  # type: ignore[arg-type]
    assert repr(name) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name, meant", [("utc", "UTC"), ("europe/berlin", "Europe/Berlin"),
                                         ("Europe/Berln", "Europe/Berlin")])
def test_a_zone_name_off_by_case_or_a_letter_names_the_zone_meant(name: str, meant: str) -> None:
    with pytest.raises(TimezoneError, match=f"did you mean '{meant}'"):
        CronSchedule.parse("* * * * *", name)


def test_attributes_str_eq_hash() -> None:
    a = CronSchedule.parse("  0   *  * * *|30 2 * * *", "Europe/Berlin")
    assert a.expression == str(a) == "0 * * * * | 30 2 * * *"
    assert a.timezone == "Europe/Berlin" and a.seconds is False
    assert a == CronSchedule.parse("0 * * * * | 30 2 * * *", "Europe/Berlin")
    assert hash(a) == hash(CronSchedule("0 * * * * | 30 2 * * *", "Europe/Berlin"))
    assert a != CronSchedule.parse("0 * * * * | 30 2 * * *", "Europe/Paris")
    assert CronSchedule.parse("0 * * * * *", seconds=True) != CronSchedule.parse("0 * * * *")
    assert a != "0 * * * * | 30 2 * * *"
    assert CronSchedule.parse("* * * * *").timezone == "Etc/UTC"
    assert "Europe/Berlin" in repr(a)


# ------------------------------------------------------------------ field matching (UTC)


def test_naive_datetime_rejected() -> None:
    with pytest.raises(ValueError, match="aware"):
        CronSchedule.parse("* * * * *").next_after(datetime(2024, 1, 1))


def test_next_after_is_strict_and_returns_utc() -> None:
    s = CronSchedule.parse("*/5 * * * *")
    assert s.next_after(utc(2024, 1, 1, 0, 5)) == utc(2024, 1, 1, 0, 10)
    assert s.next_after(utc(2024, 1, 1, 0, 4, 59, 999999)) == utc(2024, 1, 1, 0, 5)
    result = s.next_after(datetime(2024, 1, 1, 1, 5, tzinfo=ZoneInfo("Europe/Berlin")))
    assert result == utc(2024, 1, 1, 0, 10) and result.tzinfo is UTC


def test_next_after_ms() -> None:
    s = CronSchedule.parse("0 * * * *")
    ms = int(utc(2024, 1, 1, 10, 17).timestamp() * 1000) + 123
    assert s.next_after_ms(ms) == int(utc(2024, 1, 1, 11).timestamp() * 1000)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * *", utc(2024, 1, 1, 0, 0, 30), utc(2024, 1, 1, 0, 1)),
        ("5,10,50 * * * *", utc(2024, 1, 1, 0, 11), utc(2024, 1, 1, 0, 50)),
        ("10-12 * * * *", utc(2024, 1, 1, 0, 12), utc(2024, 1, 1, 1, 10)),
        ("10-30/10 * * * *", utc(2024, 1, 1, 0, 20), utc(2024, 1, 1, 0, 30)),
        ("10-30/10 * * * *", utc(2024, 1, 1, 0, 30), utc(2024, 1, 1, 1, 10)),
        ("50/4 * * * *", utc(2024, 1, 1, 0, 58), utc(2024, 1, 1, 1, 50)),
        ("0 */6 * * *", utc(2024, 1, 1, 6), utc(2024, 1, 1, 12)),
        ("0 0 1 */3 *", utc(2024, 2, 1), utc(2024, 4, 1)),
        ("0 0 1 jan,Jul *", utc(2024, 1, 1), utc(2024, 7, 1)),
        ("0 0 1 MAR-may *", utc(2024, 3, 1), utc(2024, 4, 1)),
        ("0 0 * * sun", utc(2024, 1, 1), utc(2024, 1, 7)),  # 2024-01-01 is a Monday
        ("0 0 * * 7", utc(2024, 1, 1), utc(2024, 1, 7)),
        ("0 0 * * 0", utc(2024, 1, 1), utc(2024, 1, 7)),
        ("0 0 * * MON-FRI", utc(2024, 1, 5, 12), utc(2024, 1, 8)),
        ("0 0 * * 5-7", utc(2024, 1, 7, 12), utc(2024, 1, 12)),
        ("0 0 * * 6/1", utc(2024, 1, 1), utc(2024, 1, 6)),
        ("0 12 31 * *", utc(2024, 4, 1), utc(2024, 5, 31, 12)),
        ("59 23 31 12 *", utc(2024, 1, 1), utc(2024, 12, 31, 23, 59)),
    ],
)
def test_fields(expr: str, after: datetime, expected: datetime) -> None:
    assert CronSchedule.parse(expr).next_after(after) == expected


def test_feb_29_is_found_quickly() -> None:
    s = CronSchedule.parse("0 0 29 2 *")
    assert s.next_after(utc(2024, 3, 1)) == utc(2028, 2, 29)
    assert s.next_after(utc(2097, 1, 1)) == utc(2104, 2, 29)  # 2100 is not a leap year
    began = time.perf_counter()
    for year in range(2000, 2100):
        s.next_after(utc(year, 3, 1))
    assert time.perf_counter() - began < 2.0  # field skipping, not minute ticking


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    s = CronSchedule.parse("0 0 13 * FRI")  # the 13th OR any Friday
    fires = fires_between(s, utc(2024, 9, 1), utc(2024, 10, 1))
    assert [f.day for f in fires] == [6, 13, 20, 27]  # Fri 6, Fri 13, Fri 20, Fri 27
    fires = fires_between(s, utc(2024, 10, 1), utc(2024, 11, 1))
    assert [f.day for f in fires] == [4, 11, 13, 18, 25]


def test_day_fields_and_when_one_starts_with_star() -> None:
    # "*/2" counts as unrestricted (Vixie rule): odd days AND Mondays.
    fires = fires_between(CronSchedule.parse("0 0 */2 * MON"), utc(2024, 1, 1), utc(2024, 2, 1))
    assert [f.day for f in fires] == [1, 15, 29]
    fires = fires_between(CronSchedule.parse("0 0 1-3 * *"), utc(2024, 1, 1), utc(2024, 2, 1))
    assert [f.day for f in fires] == [1, 2, 3]
    fires = fires_between(CronSchedule.parse("0 0 * * TUE"), utc(2024, 1, 1), utc(2024, 2, 1))
    assert [f.day for f in fires] == [2, 9, 16, 23, 30]


def test_alternatives_fire_at_the_earliest() -> None:
    s = CronSchedule.parse("0 9 * * MON-FRI | 30 11 * * SAT,SUN", "Europe/Berlin")
    fires = fires_between(s, utc(2024, 1, 5), utc(2024, 1, 9))  # Fri .. Mon
    assert [f.astimezone(ZoneInfo("Europe/Berlin")).strftime("%a %H:%M") for f in fires] == [
        "Fri 09:00", "Sat 11:30", "Sun 11:30", "Mon 09:00"]
    both = CronSchedule.parse("0 * * * * | 0 * * * *")
    assert fires_between(both, utc(2024, 1, 1), utc(2024, 1, 1, 3)) == [
        utc(2024, 1, 1, 0), utc(2024, 1, 1, 1), utc(2024, 1, 1, 2)]


def test_seconds_mode() -> None:
    every = CronSchedule.parse("* * * * * *", seconds=True)
    fires = fires_between(every, utc(2024, 1, 1), utc(2024, 1, 1, 0, 2))
    assert len(fires) == 120 and all(b - a == timedelta(seconds=1) for a, b in zip(fires, fires[1:]))
    assert every.next_after(utc(2024, 1, 1, 0, 0, 0, 500)) == utc(2024, 1, 1, 0, 0, 1)
    tens = CronSchedule.parse("*/10 * * * * *", seconds=True)
    assert [f.second for f in fires_between(tens, utc(2024, 1, 1), utc(2024, 1, 1, 0, 1))] == [
        0, 10, 20, 30, 40, 50]
    assert tens.next_after(utc(2024, 1, 1, 0, 0, 55)) == utc(2024, 1, 1, 0, 1)
    assert CronSchedule.parse("30 0 12 * * *", seconds=True).next_after(
        utc(2024, 1, 1, 12, 0, 30)) == utc(2024, 1, 2, 12, 0, 30)


# --------------------------------------------------------------------------- DST

BERLIN, NEW_YORK, LORD_HOWE = "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"
DST_DAYS = [  # (zone, spring-forward day, fall-back day, the repeated wall-clock hour)
    (BERLIN, date(2024, 3, 31), date(2024, 10, 27), 2),
    (NEW_YORK, date(2024, 3, 10), date(2024, 11, 3), 1),
]


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated"), DST_DAYS)
def test_daily_job_runs_exactly_once_on_dst_days(tz: str, spring: date, fall: date, repeated: int) -> None:
    zone = ZoneInfo(tz)
    # 02:30 does not exist on the spring day: it fires once, when the gap ends (03:00).
    fires = fires_on_day("30 2 * * *", tz, spring)
    assert [f.astimezone(zone).strftime("%H:%M") for f in fires] == ["03:00"]
    assert len(fires_on_day("30 2 * * *", tz, fall)) == 1
    # The repeated half-hour fires at its first occurrence only.
    fires = fires_on_day(f"30 {repeated} * * *", tz, fall)
    assert len(fires) == 1 and fires[0].astimezone(zone).fold == 0
    # Several skipped times (and the gap end itself) collapse into one run at 03:00.
    fires = fires_on_day("0,20,40 2,3 * * *", tz, spring)
    assert [f.astimezone(zone).strftime("%H:%M") for f in fires] == ["03:00", "03:20", "03:40"]


@pytest.mark.parametrize(("tz", "spring", "fall", "repeated"), DST_DAYS)
@pytest.mark.parametrize(("expr", "n_spring", "n_fall"), [
    ("0 * * * *", 23, 25), ("30 * * * *", 23, 25), ("*/15 * * * *", 92, 100), ("0-59/20 0-23 * * *", 69, 75)])
def test_every_hour_schedules_follow_elapsed_time(
        tz: str, spring: date, fall: date, repeated: int, expr: str, n_spring: int, n_fall: int) -> None:
    for day, expected in ((spring, n_spring), (fall, n_fall)):
        fires = fires_on_day(expr, tz, day)
        assert len(fires) == expected
        assert len(set(fires)) == expected
    hourly = fires_on_day("0 * * * *", tz, fall)
    assert all(b - a == timedelta(hours=1) for a, b in zip(hourly, hourly[1:]))


def test_fixed_hours_across_the_gap_and_overlap() -> None:
    # hour field 1-3 is not "every hour": one run per wall-clock match.
    assert [w.strftime("%H:%M") for w in (
        f.astimezone(ZoneInfo(BERLIN)) for f in fires_on_day("30 1-3 * * *", BERLIN, date(2024, 3, 31)))] == [
        "01:30", "03:00", "03:30"]
    assert len(fires_on_day("*/15 1-3 * * *", BERLIN, date(2024, 10, 27))) == 12
    assert len(fires_on_day("*/15 */2 * * *", BERLIN, date(2024, 10, 27))) == 48  # 02:xx once


def test_next_after_from_inside_the_repeated_hour() -> None:
    # 2024-10-27 Berlin: 02:00-03:00 CEST (00:00-01:00 UTC), then 02:00-03:00 CET (01:00-02:00 UTC).
    hourly = CronSchedule.parse("*/15 * * * *", BERLIN)
    assert hourly.next_after(utc(2024, 10, 27, 0, 50)) == utc(2024, 10, 27, 1, 0)  # 02:00 CET
    assert hourly.next_after(utc(2024, 10, 27, 1, 10)) == utc(2024, 10, 27, 1, 15)  # 02:15 CET
    assert hourly.next_after(utc(2024, 10, 27, 1, 50)) == utc(2024, 10, 27, 2, 0)  # 03:00 CET
    daily = CronSchedule.parse("15 2 * * *", BERLIN)
    assert daily.next_after(utc(2024, 10, 27, 0, 10)) == utc(2024, 10, 27, 0, 15)
    assert daily.next_after(utc(2024, 10, 27, 0, 15)) == utc(2024, 10, 28, 1, 15)  # not the 2nd 02:15
    assert daily.next_after(utc(2024, 10, 27, 1, 10)) == utc(2024, 10, 28, 1, 15)
    assert next_local("30 2 * * *", BERLIN, utc(2024, 3, 30, 12)) == datetime(2024, 3, 31, 3, 0)


def test_seconds_schedule_across_fall_back() -> None:
    s = CronSchedule.parse("*/10 * * * * *", BERLIN, seconds=True)
    fires = fires_between(s, utc(2024, 10, 27, 0, 55), utc(2024, 10, 27, 1, 5))
    assert fires == [utc(2024, 10, 27, 0, 55) + timedelta(seconds=10 * i) for i in range(60)]
    s = CronSchedule.parse("0 30 2 * * *", BERLIN, seconds=True)
    assert fires_on_day("0 30 2 * * *", BERLIN, date(2024, 3, 31), seconds=True) == [utc(2024, 3, 31, 1)]
    assert s.next_after(utc(2024, 10, 27)) == utc(2024, 10, 27, 0, 30)


def reference_fires(tz: str, start: datetime, end: datetime, match, every_hour: bool) -> list[datetime]:
    """Brute force over every UTC minute, applying the documented DST rule literally."""
    zone, out, s = ZoneInfo(tz), [], start
    while s < end:
        here, prev = s.astimezone(zone), (s - timedelta(minutes=1)).astimezone(zone)
        wall = here.replace(tzinfo=None)
        if every_hour:
            fire = match(wall)
        else:
            fire = match(wall) and here.fold == 0
            if here.utcoffset() > prev.utcoffset():  # s is the end of a gap: skipped walls fire now
                skipped = prev.replace(tzinfo=None) + timedelta(minutes=1)
                while skipped < wall and not fire:
                    fire, skipped = match(skipped), skipped + timedelta(minutes=1)
        if fire:
            out.append(s)
        s += timedelta(minutes=1)
    return out


REFERENCE_CASES = [  # expression, equivalent predicate on the wall clock, hour field matches every hour
    ("30 2 * * *", lambda w: (w.hour, w.minute) == (2, 30), False),
    ("0 2 * * *", lambda w: (w.hour, w.minute) == (2, 0), False),
    ("45 1 * * *", lambda w: (w.hour, w.minute) == (1, 45), False),
    ("*/7 1-3 * * *", lambda w: 1 <= w.hour <= 3 and w.minute % 7 == 0, False),
    ("15 */2 * * *", lambda w: w.hour % 2 == 0 and w.minute == 15, False),
    ("0 * * * *", lambda w: w.minute == 0, True),
    ("30 * * * *", lambda w: w.minute == 30, True),
    ("*/15 * * * *", lambda w: w.minute % 15 == 0, True),
    ("59 * * * *", lambda w: w.minute == 59, True),
]


@pytest.mark.parametrize(("expr", "match", "every_hour"), REFERENCE_CASES)
@pytest.mark.parametrize(("tz", "day"), [
    (BERLIN, date(2024, 3, 31)), (BERLIN, date(2024, 10, 27)),
    (NEW_YORK, date(2024, 3, 10)), (NEW_YORK, date(2024, 11, 3)),
    (LORD_HOWE, date(2024, 4, 7)), (LORD_HOWE, date(2024, 10, 6)),
    ("Australia/Sydney", date(2024, 4, 7)), ("Australia/Sydney", date(2024, 10, 6)),
])
def test_matches_brute_force_reference(expr: str, match, every_hour: bool, tz: str, day: date) -> None:
    start, end = local_day(tz, day)
    start, end = start - timedelta(hours=6), end + timedelta(hours=6)
    assert fires_between(CronSchedule.parse(expr, tz), start, end) == reference_fires(
        tz, start, end, match, every_hour)


@pytest.mark.parametrize("expr", ["* * * * *", "*/15 * * * *", "0 * * * *", "30 2 * * *", "0,15 2 * * *",
                                  "*/10 1-2 * * *", "45 1 * * *"])
def test_lord_howe_half_hour_shift_is_strictly_increasing(expr: str) -> None:
    s = CronSchedule.parse(expr, LORD_HOWE)
    for begin in (utc(2024, 4, 6, 12), utc(2024, 10, 5, 12)):  # around 2024-04-07 / 2024-10-06 02:00
        fires = fires_between(s, begin, begin + timedelta(days=1))
        assert fires and all(a < b for a, b in zip(fires, fires[1:]))
    # Spring: 02:00 -> 02:30 (+10:30 -> +11); fall: 02:00 -> 01:30 (+11 -> +10:30).
    assert next_local("0 2 * * *", LORD_HOWE, utc(2024, 10, 5, 12)) == datetime(2024, 10, 6, 2, 30)
    assert len(fires_on_day("*/15 * * * *", LORD_HOWE, date(2024, 10, 6))) == 94
    assert len(fires_on_day("*/15 * * * *", LORD_HOWE, date(2024, 4, 7))) == 98
    assert len(fires_on_day("45 1 * * *", LORD_HOWE, date(2024, 4, 7))) == 1
