//! Text a person reads: one way to print a duration in every log line and
//! error, rounded to what a person can use ("3.1 s", "250 ms", "5 min").

use std::time::Duration;

/// A duration for a log line: milliseconds below a second, one decimal
/// below 10 s, whole seconds below 2 min, then minutes (and seconds when
/// there are any), then hours and minutes.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        // Not "0 ms" for a wait that is not nothing.
        return format!("{} ms", if ms == 0 && !d.is_zero() { 1 } else { ms });
    }
    if ms < 9950 {
        let tenths = (ms + 50) / 100;
        return if tenths % 10 == 0 {
            format!("{} s", tenths / 10)
        } else {
            format!("{}.{} s", tenths / 10, tenths % 10)
        };
    }
    let s = (ms + 500) / 1000;
    if s < 120 {
        return format!("{s} s");
    }
    if s < 7200 {
        return match s % 60 {
            0 => format!("{} min", s / 60),
            r => format!("{} min {r} s", s / 60),
        };
    }
    let min = (s + 30) / 60;
    match min % 60 {
        0 => format!("{} h", min / 60),
        r => format!("{} h {r} min", min / 60),
    }
}

/// `Connection refused (os error 111)` as `Connection refused`, wherever
/// in the text (a wrapped error carries its cause's suffix).
pub fn without_os_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " (os error ".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(')') {
            rest = &after[digits + 1..];
        } else {
            out.push_str(" (os error ");
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The phases' exit statuses, `setup 0, provision 0, test 1`, or that
/// none ran.
pub fn exit_statuses(statuses: &[(crate::phase::Phase, i32)]) -> String {
    if statuses.is_empty() {
        return "no phase ran".into();
    }
    let each: Vec<String> = statuses.iter().map(|(phase, code)| format!("{phase} {code}")).collect();
    format!("exit statuses: {}", each.join(", "))
}

/// Numbers (pids...) as `12, 34, 56`.
pub fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_wrote_them() {
        let cases = [
            (Duration::ZERO, "0 ms"),
            (Duration::from_nanos(1), "1 ms"),
            (Duration::from_millis(250), "250 ms"),
            (Duration::from_secs(1), "1 s"),
            (Duration::from_nanos(3_120_304_150), "3.1 s"),
            (Duration::from_millis(9_949), "9.9 s"),
            (Duration::from_millis(9_950), "10 s"),
            (Duration::from_secs(60), "60 s"),
            (Duration::from_secs(300), "5 min"),
            (Duration::from_secs(125), "2 min 5 s"),
            (Duration::from_secs(4 * 3600), "4 h"),
            (Duration::from_secs(4 * 3600 + 600), "4 h 10 min"),
        ];
        for (d, want) in cases {
            assert_eq!(duration(d), want, "{d:?}");
        }
        assert!(duration(Duration::MAX).ends_with(" h"), "no overflow at the top");
    }

    #[test]
    fn statuses_and_lists_without_debug_output() {
        use crate::phase::Phase;
        assert_eq!(exit_statuses(&[(Phase::Setup, 127)]), "exit statuses: setup 127");
        assert_eq!(exit_statuses(&[]), "no phase ran");
        assert_eq!(list(&[12, 34]), "12, 34");
    }
}
