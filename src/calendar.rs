//! Calendar expressions: when a schedule fires. A documented subset of systemd's calendar
//! events (the form Proxmox Backup Server also uses), parsed by a pure function:
//!
//! ```text
//! minutely hourly daily weekly monthly quarterly yearly   (shorthands)
//! [WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]
//! mon..fri 02:30      sat *-1..7 15:00      *:0/15      *:*:0/5      2027-02-29 12:00
//! ```
//!
//! Each number field is `*`, a value, a range `A..B`, a repetition `A/STEP` or `*/STEP` (from
//! A, every STEP, to the field's end) or `A..B/STEP`, or a comma list of these. Weekdays are
//! `mon`…`sun` (or full names), as a list or ranges. What is left out is 00:00:00 for the
//! time, `*-*-*` for the date, every weekday. A weekday and a day given together must both
//! match (as in systemd).
//!
//! Times are civil times in a time zone (UTC unless the config names one). A civil time that
//! a daylight-saving change skips fires at the same distance after the gap (02:30 on a night
//! that jumps 02:00 → 03:00 fires at 03:30); one that happens twice fires once, the first time.

use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use std::fmt;

/// One parsed expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    original: String,
    /// Bit i set: weekday i (Monday = 0) matches.
    weekdays: u8,
    /// None: any year; else the years that match, ascending.
    years: Option<Vec<i16>>,
    months: u64,
    days: u64,
    hours: u64,
    minutes: u64,
    seconds: u64,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const LONG_DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// The first and last year an expression may name.
const YEARS: (i64, i64) = (1970, 2199);

impl Calendar {
    /// Parse an expression; the error says what is wrong in it, for a one-line message.
    pub fn parse(expr: &str) -> Result<Calendar, String> {
        let text = expr.trim();
        let full = match text.to_ascii_lowercase().as_str() {
            "minutely" => "*-*-* *:*:00".to_string(),
            "hourly" => "*-*-* *:00:00".to_string(),
            "daily" => "*-*-* 00:00:00".to_string(),
            "weekly" => "mon *-*-* 00:00:00".to_string(),
            "monthly" => "*-*-01 00:00:00".to_string(),
            "quarterly" => "*-01,04,07,10-01 00:00:00".to_string(),
            "yearly" | "annually" => "*-01-01 00:00:00".to_string(),
            _ => text.to_string(),
        };
        if full.is_empty() {
            return Err("an empty calendar expression".into());
        }
        let mut c = Calendar {
            original: text.to_string(),
            weekdays: 0x7f,
            years: None,
            months: field_all(1, 12),
            days: field_all(1, 31),
            hours: 1,
            minutes: 1,
            seconds: 1,
        };
        let mut parts: Vec<&str> = full.split_whitespace().collect();
        if parts.len() > 3 {
            return Err(format!("{text:?}: at most WEEKDAYS DATE TIME"));
        }
        if let Some(first) = parts.first() {
            if first.starts_with(|ch: char| ch.is_ascii_alphabetic()) {
                c.weekdays = weekdays(first).map_err(|e| format!("{text:?}: {e}"))?;
                parts.remove(0);
            }
        }
        let mut seen_date = false;
        let mut seen_time = false;
        for p in parts {
            if p.contains(':') && !seen_time {
                seen_time = true;
                c.time(p).map_err(|e| format!("{text:?}: {e}"))?;
            } else if p.contains('-') && !seen_date && !seen_time {
                seen_date = true;
                c.date(p).map_err(|e| format!("{text:?}: {e}"))?;
            } else {
                return Err(format!(
                    "{text:?}: {p:?} is neither a date (YYYY-MM-DD, MM-DD) nor a time (HH:MM[:SS]) \
                     in its place"
                ));
            }
        }
        Ok(c)
    }

    fn date(&mut self, p: &str) -> Result<(), String> {
        let f: Vec<&str> = p.split('-').collect();
        let (y, m, d) = match f.as_slice() {
            [y, m, d] => (Some(*y), *m, *d),
            [m, d] => (None, *m, *d),
            _ => return Err(format!("{p:?} is not a date (YYYY-MM-DD or MM-DD)")),
        };
        if let Some(y) = y.filter(|y| *y != "*") {
            let mut years = Vec::new();
            for item in y.split(',') {
                let (from, to, step) = item_range(item, YEARS.0, YEARS.1, "year")?;
                let mut v = from;
                while v <= to {
                    years.push(v as i16);
                    v += step;
                }
            }
            years.sort_unstable();
            years.dedup();
            self.years = Some(years);
        }
        self.months = field(m, 1, 12, "month")?;
        self.days = field(d, 1, 31, "day")?;
        Ok(())
    }

    fn time(&mut self, p: &str) -> Result<(), String> {
        let f: Vec<&str> = p.split(':').collect();
        let (h, m, s) = match f.as_slice() {
            [h, m] => (*h, *m, "0"),
            [h, m, s] => (*h, *m, *s),
            _ => return Err(format!("{p:?} is not a time (HH:MM or HH:MM:SS)")),
        };
        self.hours = field(h, 0, 23, "hour")?;
        self.minutes = field(m, 0, 59, "minute")?;
        self.seconds = field(s, 0, 59, "second")?;
        Ok(())
    }

    /// The expression as written.
    pub fn original(&self) -> &str {
        &self.original
    }

    fn matches_date(&self, d: Date) -> bool {
        let wd = d.weekday().to_monday_zero_offset() as u32;
        self.years
            .as_ref()
            .is_none_or(|ys| ys.binary_search(&d.year()).is_ok())
            && bit(self.months, d.month() as u32)
            && bit(self.days, d.day() as u32)
            && self.weekdays & (1 << wd) != 0
    }

    /// The first civil time at or after `from` that the expression names (None: none
    /// before the end of 2199).
    fn next_civil(&self, from: DateTime) -> Option<DateTime> {
        let mut date = from.date();
        let mut t = (from.hour(), from.minute(), from.second());
        // A bounded walk: at most one step a day to the end of the last year.
        for _ in 0..((YEARS.1 - YEARS.0 + 1) * 366) {
            if i64::from(date.year()) > YEARS.1 {
                return None;
            }
            if self.matches_date(date) {
                if let Some((h, m, s)) = self.next_time(t) {
                    return Some(date.at(h, m, s, 0));
                }
            }
            date = date.tomorrow().ok()?;
            t = (0, 0, 0);
            // Skip whole years and months that cannot match, so "feb 30"-like searches end.
            if let Some(ys) = &self.years {
                match ys.iter().find(|y| **y >= date.year()) {
                    None => return None,
                    Some(y) if *y > date.year() => date = Date::new(*y, 1, 1).ok()?,
                    _ => {}
                }
            }
            if !bit(self.months, date.month() as u32) {
                date = date.first_of_month().checked_add(1.month()).ok()?;
            }
        }
        None
    }

    /// The first (hour, minute, second) at or after `t` on a matching day.
    fn next_time(&self, t: (i8, i8, i8)) -> Option<(i8, i8, i8)> {
        for h in t.0..24 {
            if !bit(self.hours, h as u32) {
                continue;
            }
            let m0 = if h == t.0 { t.1 } else { 0 };
            for m in m0..60 {
                if !bit(self.minutes, m as u32) {
                    continue;
                }
                let s0 = if h == t.0 && m == t.1 { t.2 } else { 0 };
                if let Some(s) = (s0..60).find(|s| bit(self.seconds, *s as u32)) {
                    return Some((h, m, s));
                }
            }
        }
        None
    }

    /// The first instant strictly after `after` that the expression names, in `tz`.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let after = Timestamp::from_second(after.as_second()).ok()?;
        let mut from = tz.to_datetime(after).checked_add(1.second()).ok()?;
        // Each round either returns or moves `from` past a civil time; a fold or gap costs
        // one extra round.
        for _ in 0..4 {
            let civil = self.next_civil(from)?;
            let at = tz.to_ambiguous_timestamp(civil).compatible().ok()?;
            if at > after {
                return Some(at);
            }
            from = civil.checked_add(1.second()).ok()?;
        }
        None
    }

    /// The next `n` instants after `after`, strictly increasing.
    pub fn next_n(&self, after: Timestamp, tz: &TimeZone, n: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t, tz) {
                Some(x) => {
                    out.push(x);
                    t = x;
                }
                None => break,
            }
        }
        out
    }
}

/// The normalized form, as `systemd-analyze calendar` prints it: `Mon..Fri *-*-* 02:30:00`.
impl fmt::Display for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weekdays != 0x7f {
            const NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            let runs = show(u64::from(self.weekdays), 0, 6);
            let named: Vec<String> = runs
                .split(',')
                .map(|r| match r.split_once("..") {
                    Some((a, b)) => format!("{}..{}", NAMES[num(a)], NAMES[num(b)]),
                    None => NAMES[num(r)].to_string(),
                })
                .collect();
            write!(f, "{} ", named.join(","))?;
        }
        let years = match &self.years {
            None => "*".to_string(),
            Some(ys) => ys
                .iter()
                .map(|y| y.to_string())
                .collect::<Vec<_>>()
                .join(","),
        };
        write!(
            f,
            "{years}-{}-{} {}:{}:{}",
            show(self.months, 1, 12),
            show(self.days, 1, 31),
            show(self.hours, 0, 23),
            show(self.minutes, 0, 59),
            show(self.seconds, 0, 59)
        )
    }
}

/// A two-digit field value [`show`] printed.
fn num(s: &str) -> usize {
    s.parse().unwrap_or(0)
}

fn bit(set: u64, v: u32) -> bool {
    set & (1u64 << v) != 0
}

fn field_all(lo: u32, hi: u32) -> u64 {
    (lo..=hi).fold(0, |s, v| s | 1 << v)
}

/// A field's values as a bit set, from `*`, values, ranges, steps and lists.
fn field(text: &str, lo: u32, hi: u32, what: &str) -> Result<u64, String> {
    let mut set = 0u64;
    for item in text.split(',') {
        let (from, to, step) = item_range(item, i64::from(lo), i64::from(hi), what)?;
        let mut v = from;
        while v <= to {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

/// One list item as (first, last, step).
fn item_range(item: &str, lo: i64, hi: i64, what: &str) -> Result<(i64, i64, i64), String> {
    let num = |s: &str| -> Result<i64, String> {
        let v: i64 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a {what} (a number, *, A..B or A/STEP)"))?;
        if v < lo || v > hi {
            return Err(format!("{what} {v} is out of range {lo}..{hi}"));
        }
        Ok(v)
    };
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => {
            let step: i64 = s
                .parse()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| format!("{item:?}: the step {s:?} is not a positive number"))?;
            (r, step)
        }
        None => (item, 1),
    };
    let (from, to) = if range == "*" {
        (lo, hi)
    } else if let Some((a, b)) = range.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("{item:?}: the range runs backwards"));
        }
        (a, b)
    } else {
        let a = num(range)?;
        (
            a,
            if step > 1 || item.contains('/') {
                hi
            } else {
                a
            },
        )
    };
    Ok((from, to, step))
}

fn weekdays(text: &str) -> Result<u8, String> {
    let day = |s: &str| -> Result<usize, String> {
        let s = s.to_ascii_lowercase();
        DAYS.iter()
            .position(|d| *d == s)
            .or_else(|| LONG_DAYS.iter().position(|d| *d == s))
            .ok_or_else(|| format!("{s:?} is not a weekday (mon, tue, …, sun)"))
    };
    let mut set = 0u8;
    for item in text.split(',') {
        match item.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a > b {
                    return Err(format!(
                        "{item:?}: weekday ranges run from Monday to Sunday"
                    ));
                }
                (a..=b).for_each(|i| set |= 1 << i);
            }
            None => set |= 1 << day(item)?,
        }
    }
    Ok(set)
}

/// A set as the shortest list of values and ranges (`*` for all).
fn show(set: u64, lo: u32, hi: u32) -> String {
    if set == field_all(lo, hi) {
        return "*".into();
    }
    let mut parts = Vec::new();
    let mut v = lo;
    while v <= hi {
        if !bit(set, v) {
            v += 1;
            continue;
        }
        let start = v;
        while v < hi && bit(set, v + 1) {
            v += 1;
        }
        parts.push(if v - start >= 2 {
            format!("{start:02}..{v:02}")
        } else if v > start {
            format!("{start:02},{v:02}")
        } else {
            format!("{start:02}")
        });
        v += 1;
    }
    parts.join(",")
}

/// The time zone a config names (`None`: UTC), or a one-line error.
pub fn zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None | Some("UTC") | Some("utc") => Ok(TimeZone::UTC),
        Some(n) => TimeZone::get(n).map_err(|_| {
            format!("{n:?} is not a time zone this machine knows (e.g. Europe/Berlin, UTC)")
        }),
    }
}

/// `Wed 2026-12-02 02:30:00 CET` for people.
pub fn show_time(t: Timestamp, tz: &TimeZone) -> String {
    let z = t.to_zoned_datetime(tz.clone());
    let wd = match z.weekday() {
        Weekday::Monday => "Mon",
        Weekday::Tuesday => "Tue",
        Weekday::Wednesday => "Wed",
        Weekday::Thursday => "Thu",
        Weekday::Friday => "Fri",
        Weekday::Saturday => "Sat",
        Weekday::Sunday => "Sun",
    };
    format!("{wd} {}", z.strftime("%Y-%m-%d %H:%M:%S %Z"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(expr: &str, after: &str, tz: &str) -> String {
        let tz = zone(Some(tz)).unwrap();
        let c = Calendar::parse(expr).unwrap();
        c.next_after(ts(after), &tz)
            .map(|t| {
                t.to_zoned_datetime(tz.clone())
                    .strftime("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string()
            })
            .unwrap_or_else(|| "never".into())
    }

    #[test]
    fn a_table_of_expressions_and_their_next_times() {
        let table = [
            // expression, after (UTC), zone, next (local, with offset)
            (
                "daily",
                "2026-12-01T10:00:00Z",
                "UTC",
                "2026-12-02T00:00:00+00:00",
            ),
            (
                "hourly",
                "2026-12-01T10:00:00Z",
                "UTC",
                "2026-12-01T11:00:00+00:00",
            ),
            (
                "minutely",
                "2026-12-01T10:00:59Z",
                "UTC",
                "2026-12-01T10:01:00+00:00",
            ),
            (
                "weekly",
                "2026-12-01T10:00:00Z",
                "UTC",
                "2026-12-07T00:00:00+00:00",
            ),
            (
                "monthly",
                "2026-12-01T00:00:00Z",
                "UTC",
                "2027-01-01T00:00:00+00:00",
            ),
            (
                "yearly",
                "2026-12-01T00:00:00Z",
                "UTC",
                "2027-01-01T00:00:00+00:00",
            ),
            (
                "quarterly",
                "2026-12-01T00:00:00Z",
                "UTC",
                "2027-01-01T00:00:00+00:00",
            ),
            // 2026-12-04 is a Friday: the next weekday 02:30 after Friday noon is Monday.
            (
                "mon..fri 02:30",
                "2026-12-04T12:00:00Z",
                "UTC",
                "2026-12-07T02:30:00+00:00",
            ),
            // The first Saturday of a month, 15:00: January 2027's is the 2nd.
            (
                "sat *-1..7 15:00",
                "2026-12-05T15:00:00Z",
                "UTC",
                "2027-01-02T15:00:00+00:00",
            ),
            (
                "*:0/15",
                "2026-12-01T10:16:00Z",
                "UTC",
                "2026-12-01T10:30:00+00:00",
            ),
            (
                "*:0/15",
                "2026-12-01T23:59:00Z",
                "UTC",
                "2026-12-02T00:00:00+00:00",
            ),
            (
                "*:*:0/5",
                "2026-12-01T10:00:03Z",
                "UTC",
                "2026-12-01T10:00:05+00:00",
            ),
            (
                "*:*:0/5",
                "2026-12-01T10:00:05Z",
                "UTC",
                "2026-12-01T10:00:10+00:00",
            ),
            // Month ends: the 31st skips the months without one.
            (
                "*-*-31 12:00",
                "2027-01-31T12:00:00Z",
                "UTC",
                "2027-03-31T12:00:00+00:00",
            ),
            (
                "*-*-29,30,31",
                "2027-02-01T00:00:00Z",
                "UTC",
                "2027-03-29T00:00:00+00:00",
            ),
            // Leap days: the next 29 February after 2025 is in 2028.
            (
                "*-02-29 00:00",
                "2025-03-01T00:00:00Z",
                "UTC",
                "2028-02-29T00:00:00+00:00",
            ),
            ("2027-02-29", "2026-01-01T00:00:00Z", "UTC", "never"),
            (
                "2030-06-01 08:00",
                "2026-01-01T00:00:00Z",
                "UTC",
                "2030-06-01T08:00:00+00:00",
            ),
            (
                "sun 2027-*-* 00:00",
                "2026-06-01T00:00:00Z",
                "UTC",
                "2027-01-03T00:00:00+00:00",
            ),
            // A named zone: Berlin is UTC+1 in winter, +2 in summer.
            (
                "daily",
                "2026-12-01T10:00:00Z",
                "Europe/Berlin",
                "2026-12-02T00:00:00+01:00",
            ),
            (
                "daily",
                "2026-07-01T10:00:00Z",
                "Europe/Berlin",
                "2026-07-02T00:00:00+02:00",
            ),
            // DST starts 2027-03-28 in Berlin: 02:00 → 03:00. 02:30 does not exist that night
            // and fires at 03:30 (the gap's length later); the next night is 02:30 again.
            (
                "02:30",
                "2027-03-27T12:00:00Z",
                "Europe/Berlin",
                "2027-03-28T03:30:00+02:00",
            ),
            (
                "02:30",
                "2027-03-28T02:00:00Z",
                "Europe/Berlin",
                "2027-03-29T02:30:00+02:00",
            ),
            // DST ends 2026-10-25: 03:00 → 02:00, so 02:30 happens twice; it fires once, the
            // first time (+02:00), and not again in the repeated hour.
            (
                "02:30",
                "2026-10-24T12:00:00Z",
                "Europe/Berlin",
                "2026-10-25T02:30:00+02:00",
            ),
            (
                "02:30",
                "2026-10-25T00:30:00Z",
                "Europe/Berlin",
                "2026-10-26T02:30:00+01:00",
            ),
            // Hourly across the repeated hour: 02:00 fired at 00:00Z, so 03:00 is next.
            (
                "hourly",
                "2026-10-25T00:00:00Z",
                "Europe/Berlin",
                "2026-10-25T03:00:00+01:00",
            ),
            (
                "*:30",
                "2026-11-01T05:31:00Z",
                "America/New_York",
                "2026-11-01T02:30:00-05:00",
            ),
        ];
        for (expr, after, tz, want) in table {
            assert_eq!(next(expr, after, tz), want, "{expr} after {after} in {tz}");
        }
    }

    #[test]
    fn hourly_across_the_repeated_hour_fires_each_civil_hour_once() {
        let tz = zone(Some("Europe/Berlin")).unwrap();
        let c = Calendar::parse("hourly").unwrap();
        let got: Vec<String> = c
            .next_n(ts("2026-10-24T22:30:00Z"), &tz, 4)
            .iter()
            .map(|t| t.to_string())
            .collect();
        // 01:00+02, 02:00+02, then 03:00+01: 02:00+01 repeats a civil time that fired.
        assert_eq!(
            got,
            [
                "2026-10-24T23:00:00Z",
                "2026-10-25T00:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T03:00:00Z"
            ]
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (expr, says) in [
            ("", "empty"),
            ("fri..mon", "Monday to Sunday"),
            ("funday", "not a weekday"),
            ("25:00", "hour 25 is out of range 0..23"),
            ("*:60", "minute 60"),
            ("*-13-01", "month 13"),
            ("*-*-1..", "not a day"),
            ("*:*/0", "step"),
            ("daily 10:00", "not a weekday"),
            ("10:00 12:00", "neither a date"),
            ("1 2 3 4", "at most"),
            ("5..3:00", "backwards"),
        ] {
            let e = Calendar::parse(expr).unwrap_err();
            assert!(e.contains(says), "{expr:?}: {e}");
        }
    }

    #[test]
    fn the_normalized_form() {
        for (expr, norm) in [
            ("daily", "*-*-* 00:00:00"),
            ("mon..fri 02:30", "Mon..Fri *-*-* 02:30:00"),
            ("sat,sun", "Sat,Sun *-*-* 00:00:00"),
            ("sat *-1..7 15:00", "Sat *-*-01..07 15:00:00"),
            ("*:0/15", "*-*-* *:00,15,30,45:00"),
            ("2027-02-28", "2027-02-28 00:00:00"),
        ] {
            assert_eq!(Calendar::parse(expr).unwrap().to_string(), norm, "{expr}");
        }
    }

    fn exprs() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("daily".to_string()),
            Just("hourly".to_string()),
            Just("monthly".to_string()),
            Just("*-02-29 00:00".to_string()),
            Just("sat *-1..7 15:00".to_string()),
            (0u32..24, 0u32..60).prop_map(|(h, m)| format!("{h:02}:{m:02}")),
            (1u32..60).prop_map(|s| format!("*:0/{s}")),
            (1u32..60).prop_map(|s| format!("*:*:0/{s}")),
            (1u32..=31, 0u32..24).prop_map(|(d, h)| format!("*-*-{d} {h}:00")),
            (0usize..7, 0usize..7).prop_map(|(a, b)| format!(
                "{}..{} 12:00",
                DAYS[a.min(b)],
                DAYS[a.max(b)]
            )),
        ]
    }

    proptest! {
        #[test]
        fn the_next_time_is_later_and_sequences_strictly_increase(
            expr in exprs(),
            at in 0i64..4_000_000_000,
            zone_i in 0usize..3,
        ) {
            let tz = zone(Some(["UTC", "Europe/Berlin", "America/New_York"][zone_i])).unwrap();
            let c = Calendar::parse(&expr).unwrap();
            let from = Timestamp::from_second(at).unwrap();
            let seq = c.next_n(from, &tz, 5);
            prop_assert!(!seq.is_empty(), "{expr} never fires after {from}");
            prop_assert!(seq[0] > from);
            for w in seq.windows(2) {
                prop_assert!(w[1] > w[0], "{expr}: {} then {}", w[0], w[1]);
            }
        }
    }
}
