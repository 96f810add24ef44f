//! The units of the command line and of the profiles table: rates in bits
//! per second (`2Mbit`), sizes in bytes (`64KiB`), probabilities (`1%`) and
//! durations (`300ms`); parsed into numbers and printed back.

use std::time::Duration;

/// A rate such as `2Mbit`, `512kbit`, `1.5Mbit/s`, `64000` (bit/s) or
/// `unlimited`. Prefixes are decimal, as in tc: k = 1000.
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (num, unit) = split_number(t);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as \"2Mbit\" or \"unlimited\""))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" | "bps" => 1.0,
        "k" | "kbit" | "kbps" => 1e3,
        "m" | "mbit" | "mbps" => 1e6,
        "g" | "gbit" | "gbps" => 1e9,
        _ => {
            return Err(format!(
                "unknown rate unit in {text:?} (use bit, kbit, Mbit, Gbit)"
            ))
        }
    };
    let bps = (value * mult).round();
    if !(1.0..1e15).contains(&bps) {
        return Err(format!(
            "rate {text:?} is out of range (use \"unlimited\" for no limit)"
        ));
    }
    Ok(Some(bps as u64))
}

/// A size in bytes: `1400`, `1400B`, `64KiB`, `1MiB`, `64KB` (= 64000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = split_number(t);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"64KiB\""))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        _ => {
            return Err(format!(
                "unknown size unit in {text:?} (use B, KiB, MiB, KB, MB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A probability: `1%`, `0.1%` or a fraction `0.01`.
pub fn parse_probability(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (t, 1.0),
    };
    let p = num
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a probability such as \"1%\" or \"0.01\""))?
        / scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("probability {text:?} is outside 0%..100%"));
    }
    Ok(p)
}

/// A duration: `300ms`, `2m`, `30s`, `1h 30m`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{text:?} is not a duration such as \"300ms\": {e}"))
}

/// `2 Mbit/s`, `512 kbit/s`, `1.5 Mbit/s`, `unlimited`.
pub fn format_rate(rate: Option<u64>) -> String {
    let Some(bps) = rate else {
        return "unlimited".into();
    };
    let (value, unit) = match bps {
        b if b >= 1_000_000_000 => (b as f64 / 1e9, "Gbit/s"),
        b if b >= 1_000_000 => (b as f64 / 1e6, "Mbit/s"),
        b if b >= 1_000 => (b as f64 / 1e3, "kbit/s"),
        b => (b as f64, "bit/s"),
    };
    format!("{} {unit}", trim_float(value))
}

/// `64 KiB`, `1500 B`.
pub fn format_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// `1%`, `0.1%`.
pub fn format_probability(p: f64) -> String {
    format!("{}%", trim_float(p * 100.0))
}

/// `300ms`, `2m`, `0s`.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".into()
    } else {
        humantime::format_duration(d).to_string().replace(' ', "")
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn split_number(t: &str) -> (&str, &str) {
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    (num, unit.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_sizes_probabilities_and_durations_parse_and_print_back() {
        assert_eq!(parse_rate("2Mbit"), Ok(Some(2_000_000)));
        assert_eq!(parse_rate("512kbit"), Ok(Some(512_000)));
        assert_eq!(parse_rate("1.5Mbit/s"), Ok(Some(1_500_000)));
        assert_eq!(parse_rate("64000"), Ok(Some(64_000)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("2MB").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1400"), Ok(1400));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert!(parse_size("64 parsecs").is_err());
        assert_eq!(parse_probability("1%"), Ok(0.01));
        assert_eq!(parse_probability("0.5"), Ok(0.5));
        assert!(parse_probability("150%").is_err());
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(format_rate(Some(512_000)), "512 kbit/s");
        assert_eq!(format_rate(Some(1_500_000)), "1.5 Mbit/s");
        assert_eq!(format_rate(None), "unlimited");
        assert_eq!(format_size(65_536), "64 KiB");
        assert_eq!(format_probability(0.001), "0.1%");
        assert_eq!(format_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }
}
