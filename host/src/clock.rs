//! Timestamps as DPS writes them: RFC 3339 UTC with seven fractional digits, the .NET
//! `DateTime` precision real DPS emits and every service SDK parses.

use time::OffsetDateTime;

/// Formats `at` as `2026-11-26T07:07:30.1234567Z`.
pub fn format_utc(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.nanosecond() / 100
    )
}

/// The current time, formatted by [`format_utc`].
pub fn now_utc() -> String {
    format_utc(OffsetDateTime::now_utc())
}

/// Seconds since the Unix epoch, for SAS expiry checks.
pub fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_seven_fraction_digits() {
        let at = time::macros::datetime!(2024-02-03 04:05:06.123_456_789 UTC);
        assert_eq!(format_utc(at), "2024-02-03T04:05:06.1234567Z");
    }
}
