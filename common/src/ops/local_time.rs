//! The local time of day, for a receiver's `schedule` (windows written in
//! local time, as a DBA reads a wall clock at the site).

/// Seconds since local midnight, now, in the zone `TZ` or /etc/localtime
/// name (the C library's `localtime_r`); UTC if the zone cannot be read.
pub fn seconds_of_day() -> u32 {
    // SAFETY: `time` with a null pointer only returns the time;
    // `localtime_r` writes only into the `tm` we own and is thread-safe.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return now.rem_euclid(86_400) as u32;
    }
    // A leap second (tm_sec 60) counts as the last second of its minute.
    (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec.min(59)) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_time_of_day_is_within_a_day() {
        assert!(super::seconds_of_day() < 86_400);
    }
}
