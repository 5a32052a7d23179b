//! ISO 8601 UTC timestamps, as the server expects in fragments and events.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, as `2026-11-25T12:53:15.123456+00:00` (Python's `isoformat()` shape).
pub(crate) fn now_iso8601() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format_unix(d.as_secs(), d.subsec_micros())
}

pub(crate) fn format_unix(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Reads `YYYY-MM-DD[T ]HH:MM:SS[.frac][Z|+00:00]` as UTC (offsets other
/// than zero are not expected from the server and are refused).
pub(crate) fn parse_iso8601(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.get(4..5)? != "-" || !matches!(s.get(10..11)?, "T" | " ") || !(1..=12).contains(&mo) || !(1..=31).contains(&d)
    {
        return None;
    }
    let rest = s.get(19..)?;
    let zone = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if !matches!(zone, "" | "Z" | "+00:00" | "+0000") {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of below.
    let (y, mo) = (y as i64 - i64::from(mo <= 2), mo as i64);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + sec;
    Some(UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
#[allow(clippy::cast_possible_truncation)] // day 1..=31 and month 1..=12 by construction
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_unix(0, 0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(format_unix(951_782_400, 5), "2000-02-29T00:00:00.000005+00:00");
        assert_eq!(format_unix(1_795_611_195, 0), "2026-11-25T12:53:15.000000+00:00");
    }

    #[test]
    fn parses_what_it_formats() {
        for secs in [0, 951_782_400, 1_795_611_195] {
            let t = parse_iso8601(&format_unix(secs, 123)).expect("parses");
            assert_eq!(t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()), Some(secs));
        }
        assert!(parse_iso8601("2023-11-14T20:00:00Z").is_some());
        assert!(parse_iso8601("2023-11-14T20:00:00+02:00").is_none());
        assert!(parse_iso8601("Tue, 14 Nov 2023 20:00:00 GMT").is_none());
    }
}
