//! Proleptic Gregorian calendar arithmetic over the whole range Postgres accepts
//! (4713 BC to 5874897 AD), with astronomical year numbering (year 0 is 1 BC).

/// Days from 1970-01-01 to 2000-01-01, the Postgres epoch.
pub const PG_EPOCH_UNIX_DAYS: i64 = 10_957;

/// A calendar date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilDate {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

/// The date `days` after 1970-01-01 (negative: before).
pub fn civil_from_unix_days(days: i64) -> CivilDate {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    CivilDate { year, month, day }
}

/// Days from 1970-01-01 to a date, or `None` when the month or day does not exist.
pub fn unix_days_from_civil(date: CivilDate) -> Option<i64> {
    let CivilDate { year, month, day } = date;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// `YYYY-MM-DD`, with years outside 0..=9999 written `+YYYYYY` / `-YYYYYY` (ISO 8601 expanded, as JavaScript does).
pub fn format_date(date: CivilDate) -> String {
    let CivilDate { year, month, day } = date;
    if (0..=9999).contains(&year) {
        format!("{year:04}-{month:02}-{day:02}")
    } else {
        format!("{}{:06}-{month:02}-{day:02}", if year < 0 { '-' } else { '+' }, year.unsigned_abs())
    }
}

/// Parses what [`format_date`] writes (4 digits, or a sign and 4 or more digits) at the start of `text`;
/// returns the date and the rest of the text.
pub fn parse_date_prefix(text: &str) -> Option<(CivilDate, &str)> {
    let (sign, unsigned) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => (0, text),
    };
    let year_digits = unsigned.bytes().take_while(u8::is_ascii_digit).count();
    if (sign == 0 && year_digits != 4) || !(4..=9).contains(&year_digits) {
        return None;
    }
    let magnitude = unsigned[..year_digits].parse::<i64>().ok()?;
    let year = if sign < 0 { -magnitude } else { magnitude };
    let rest = &unsigned[year_digits..];
    let bytes = rest.as_bytes();
    if bytes.len() < 6 || bytes[0] != b'-' || bytes[3] != b'-' {
        return None;
    }
    let month = two_digits(&rest[1..3])?;
    let day = two_digits(&rest[4..6])?;
    let date = CivilDate { year, month, day };
    unix_days_from_civil(date)?;
    Some((date, &rest[6..]))
}

/// A two-digit decimal number.
pub fn two_digits(text: &str) -> Option<u32> {
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_dates_agree_across_the_postgres_range() {
        for days in (-2_451_545 - 10..=2_147_483_647 - 2_451_545).step_by(9_973).chain([-1, 0, 1, 10_957, -719_528]) {
            let date = civil_from_unix_days(days);
            assert_eq!(unix_days_from_civil(date), Some(days), "{date:?}");
            assert_eq!(parse_date_prefix(&format_date(date)).map(|(d, _)| d), Some(date));
        }
        assert_eq!(format_date(civil_from_unix_days(0)), "1970-01-01");
        assert_eq!(format_date(civil_from_unix_days(PG_EPOCH_UNIX_DAYS)), "2000-01-01");
        assert_eq!(format_date(civil_from_unix_days(-719_528)), "0000-01-01");
        assert_eq!(format_date(CivilDate { year: -4712, month: 1, day: 1 }), "-004712-01-01");
        assert_eq!(format_date(CivilDate { year: 5_874_897, month: 12, day: 31 }), "+5874897-12-31");
        assert_eq!(unix_days_from_civil(CivilDate { year: 2024, month: 2, day: 30 }), None);
        assert!(unix_days_from_civil(CivilDate { year: 2000, month: 2, day: 29 }).is_some());
        assert_eq!(unix_days_from_civil(CivilDate { year: 1900, month: 2, day: 29 }), None);
        assert_eq!(parse_date_prefix("20240-01-01"), None);
    }
}
