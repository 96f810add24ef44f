//! PostgreSQL's epoch (2000-01-01 UTC), in which pgoutput and the progress
//! row carry commit times as microseconds.

use std::time::{Duration, SystemTime};

/// Seconds from the Unix epoch to PostgreSQL's.
pub const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A PostgreSQL-epoch timestamp in microseconds as a `SystemTime`
/// (negative values clamp to the epoch).
pub fn from_pg_micros(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(PG_EPOCH_UNIX_SECS)
        + Duration::from_micros(micros.max(0) as u64)
}

/// Now, in microseconds since PostgreSQL's epoch.
pub fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    unix - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

/// Seconds from a PostgreSQL-epoch timestamp to now (0 if in the future).
pub fn age_seconds(micros: i64) -> f64 {
    SystemTime::now()
        .duration_since(from_pg_micros(micros))
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_round_trips() {
        assert_eq!(
            from_pg_micros(0)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            946_684_800
        );
        let now = now_pg_micros();
        assert!(age_seconds(now) < 5.0);
    }
}
