//! The validity period of an X.509 certificate, read from its DER without a full parser: a
//! pinned leaf is not run through chain validation, so its dates are checked here, and the
//! node's days-left metric needs them for every certificate it holds.

/// A certificate's `notBefore` and `notAfter`, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// Reads the validity of a DER certificate; `None` if it is not well-formed enough to
    /// find it.
    pub fn of(cert_der: &[u8]) -> Option<Validity> {
        let (tag, cert, _) = tlv(cert_der)?;
        if tag != 0x30 {
            return None;
        }
        let (tag, tbs, _) = tlv(cert)?;
        if tag != 0x30 {
            return None;
        }
        let mut rest = tbs;
        // [0] version, optional
        let (tag, _, after) = tlv(rest)?;
        if tag == 0xa0 {
            rest = after;
        }
        // serial, signature algorithm, issuer
        for expected in [0x02, 0x30, 0x30] {
            let (tag, _, after) = tlv(rest)?;
            if tag != expected {
                return None;
            }
            rest = after;
        }
        let (tag, validity, _) = tlv(rest)?;
        if tag != 0x30 {
            return None;
        }
        let (t1, nb, after) = tlv(validity)?;
        let (t2, na, _) = tlv(after)?;
        Some(Validity {
            not_before: time(t1, nb)?,
            not_after: time(t2, na)?,
        })
    }

    /// Whole days from `now` (Unix seconds) until `notAfter`, rounded down; negative once
    /// expired.
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// One DER tag-length-value: (tag, content, what follows). Definite lengths of up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    Some((tag, content, after))
}

/// UTCTime (tag 0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |b: &[u8]| -> Option<i64> {
        b.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            // RFC 5280 4.1.2.5.1: 50..99 are 19xx, 00..49 are 20xx
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest.get(10) != Some(&b'Z') {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, sec) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// `secs` (Unix) as an ISO 8601 UTC date and time, for messages.
pub(crate) fn date(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(nb: (i32, u8, u8), na: (i32, u8, u8)) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["v.example".to_owned()]).expect("params");
        p.not_before = rcgen::date_time_ymd(nb.0, nb.1, nb.2);
        p.not_after = rcgen::date_time_ymd(na.0, na.1, na.2);
        let key = rcgen::KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn reads_utc_and_generalized_times() {
        // 2049 is the last UTCTime year, 2050 needs GeneralizedTime.
        let v = Validity::of(&cert((1999, 12, 31), (2050, 1, 2))).expect("validity");
        assert_eq!(v.not_before, 946_598_400);
        assert_eq!(v.not_after, 2_524_694_400);
        let v = Validity::of(&cert((2024, 2, 29), (2049, 3, 1))).expect("validity");
        assert_eq!(v.not_before, 1_709_164_800);
        assert_eq!(v.not_after, 2_498_169_600);
        assert_eq!(v.days_left(v.not_after - 86_400 * 3), 3);
        assert_eq!(v.days_left(v.not_after + 1), -1);
        assert_eq!(date(v.not_before), "2024-02-29 00:00:00 UTC");
        assert_eq!(date(v.not_after + 3661), "2049-03-01 01:01:01 UTC");
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        let good = cert((2020, 1, 1), (2030, 1, 1));
        for cut in 0..good.len() {
            let _ = Validity::of(&good[..cut]);
        }
        assert_eq!(Validity::of(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(Validity::of(b""), None);
    }
}
