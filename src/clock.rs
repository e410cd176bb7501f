//! Calendar arithmetic for the daytime (RFC 867) and time (RFC 868) handlers, without a
//! date crate.
//!
//! Both services only ever need UTC: a Unix timestamp turned into a civil date with Howard
//! Hinnant's `civil_from_days` algorithm, and a count of seconds since 1900. Everything here
//! takes the instant as an argument so the tests can pin it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds from 1900-01-01 00:00 UTC (RFC 868's epoch) to 1970-01-01 00:00 UTC.
const SECONDS_1900_TO_1970: i64 = 2_208_988_800;

const SECONDS_PER_DAY: i64 = 86_400;

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC date and time of day, broken down the way people read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CivilTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday .. 6 = Saturday
    pub weekday: u32,
}

/// Whole seconds since the Unix epoch, negative before 1970, so a clock set far back still
/// gives an answer instead of an error.
pub(crate) fn unix_seconds(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Before the epoch: round toward minus infinity so 1969-12-31 23:59:59.5 is :59.
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() > 0 {
                -secs - 1
            } else {
                -secs
            }
        }
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day) in the
/// proleptic Gregorian calendar. Exact for every day an `i64` of seconds can reach.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day of the week for days since 1970-01-01 (a Thursday); 0 = Sunday.
pub(crate) fn weekday_from_days(days: i64) -> u32 {
    (days + 4).rem_euclid(7) as u32
}

impl CivilTime {
    /// The UTC calendar reading of `now`.
    pub(crate) fn utc(now: SystemTime) -> CivilTime {
        let secs = unix_seconds(now);
        let days = secs.div_euclid(SECONDS_PER_DAY);
        let of_day = secs.rem_euclid(SECONDS_PER_DAY) as u32;
        let (year, month, day) = civil_from_days(days);
        CivilTime {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day / 60 % 60,
            second: of_day % 60,
            weekday: weekday_from_days(days),
        }
    }
}

/// The daytime (RFC 867) reply: the RFC's own example format, in UTC, ending in CR LF,
/// e.g. `Thursday, November 26, 2026 14:40:51-UTC\r\n`.
pub(crate) fn daytime_line(now: SystemTime) -> String {
    let t = CivilTime::utc(now);
    format!(
        "{}, {} {}, {} {:02}:{:02}:{:02}-UTC\r\n",
        WEEKDAYS[t.weekday as usize],
        MONTHS[(t.month - 1) as usize],
        t.day,
        t.year,
        t.hour,
        t.minute,
        t.second
    )
}

/// The time (RFC 868) value: seconds since 1900-01-01 00:00 UTC, modulo 2^32, so it wraps in
/// 2036 like every RFC 868 client expects instead of failing.
pub(crate) fn rfc868_seconds(now: SystemTime) -> u32 {
    let since_1900 = unix_seconds(now).wrapping_add(SECONDS_1900_TO_1970);
    since_1900.rem_euclid(1 << 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn is_leap(y: i64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }

    fn month_length(year: i64, month: u32) -> u32 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    /// Days since 1970-01-01 of a civil date, counted the slow obvious way, to check against.
    fn days_slow(year: i64, month: u32, day: u32) -> i64 {
        let mut days = 0;
        for y in 1970..year {
            days += if is_leap(y) { 366 } else { 365 };
        }
        for m in 1..month {
            days += i64::from(month_length(year, m));
        }
        days + i64::from(day) - 1
    }

    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }

    #[test]
    fn civil_from_days_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(weekday_from_days(0), 4, "1970-01-01 was a Thursday");

        let leap_day = days_slow(2000, 2, 29);
        assert_eq!(leap_day, 11_016);
        assert_eq!(civil_from_days(leap_day), (2000, 2, 29));
        assert_eq!(civil_from_days(leap_day + 1), (2000, 3, 1));
        assert_eq!(weekday_from_days(leap_day), 2, "2000-02-29 was a Tuesday");

        let thanksgiving = days_slow(2026, 11, 26);
        assert_eq!(civil_from_days(thanksgiving), (2026, 11, 26));
        assert_eq!(
            weekday_from_days(thanksgiving),
            4,
            "2026-11-26 is a Thursday"
        );

        // 2100 is not a leap year: the day after Feb 28 is Mar 1.
        let march = days_slow(2100, 3, 1);
        assert_eq!(civil_from_days(march), (2100, 3, 1));
        assert_eq!(civil_from_days(march - 1), (2100, 2, 28));
        assert_eq!(weekday_from_days(march), 1, "2100-03-01 is a Monday");

        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn civil_from_days_agrees_with_counting_for_every_day_1970_to_2101() {
        let mut days = 0;
        for year in 1970..=2100 {
            for month in 1..=12 {
                for day in 1..=month_length(year, month) {
                    assert_eq!(civil_from_days(days), (year, month, day));
                    days += 1;
                }
            }
        }
        assert_eq!(days, days_slow(2101, 1, 1));
    }

    #[test]
    fn daytime_line_matches_rfc_example_format() {
        let t = days_slow(2026, 11, 26) * SECONDS_PER_DAY + 14 * 3600 + 40 * 60 + 51;
        assert_eq!(
            daytime_line(at(t)),
            "Thursday, November 26, 2026 14:40:51-UTC\r\n"
        );
        assert_eq!(
            daytime_line(at(0)),
            "Thursday, January 1, 1970 00:00:00-UTC\r\n"
        );
        assert_eq!(
            daytime_line(at(-1)),
            "Wednesday, December 31, 1969 23:59:59-UTC\r\n"
        );
    }

    #[test]
    fn rfc868_epoch_and_wrap() {
        assert_eq!(rfc868_seconds(at(0)), 2_208_988_800);
        assert_eq!(rfc868_seconds(at(-SECONDS_1900_TO_1970)), 0);
        // 2036-02-07 06:28:16 UTC is 2^32 seconds after 1900: the counter wraps to 0.
        let wrap = (1_i64 << 32) - SECONDS_1900_TO_1970;
        assert_eq!(CivilTime::utc(at(wrap)).year, 2036);
        assert_eq!(rfc868_seconds(at(wrap - 1)), u32::MAX);
        assert_eq!(rfc868_seconds(at(wrap)), 0);
        assert_eq!(rfc868_seconds(at(wrap + 5)), 5);
    }

    #[test]
    fn sub_second_before_epoch_rounds_down() {
        let t = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(unix_seconds(t), -1);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1500)), 1);
    }
}
