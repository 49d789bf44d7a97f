//! Deadlines that shrink hop by hop.
//!
//! A request's deadline is the earliest of: its arrival plus the policy's request timeout,
//! and the budget its caller gave it: gRPC's `grpc-timeout` (PROTOCOL-HTTP2.md) or, for
//! plain HTTP, `malla-timeout-ms` (whole milliseconds). The remaining budget travels
//! upstream in the same field, rewritten at send time, so every hop sees what is left after
//! the hops before it; relative budgets rather than absolute times, because the hosts'
//! clocks do not agree. A request whose deadline has passed is not sent at all.

use std::time::Duration;

use tokio::time::Instant;

/// The most digits `grpc-timeout` allows.
const GRPC_MAX_DIGITS: usize = 8;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > GRPC_MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a remaining budget as `grpc-timeout`, in the finest unit that fits 8 digits.
pub fn format_grpc_timeout(d: Duration) -> String {
    const LIMIT: u128 = 100_000_000;
    let nanos = d.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
    ] {
        // Rounded up, so a budget never grows by being re-encoded... and never reads 0
        // while some time is left.
        let value = nanos.div_ceil(per);
        if value < LIMIT {
            return format!("{value}{unit}");
        }
    }
    format!("{}H", (nanos.div_ceil(3_600_000_000_000)).min(LIMIT - 1))
}

/// Parses `malla-timeout-ms`.
pub fn parse_timeout_ms(value: &[u8]) -> Option<Duration> {
    if value.is_empty() || value.len() > 12 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// The deadline of one request: the earliest of its budgets, `None` when unbounded. The
/// arrival time is only asked for when there is a budget (most requests have none, and a
/// clock read is not free on the hot path).
pub fn deadline(
    arrived: impl FnOnce() -> Instant,
    request_timeout: Duration,
    incoming: Option<Duration>,
) -> Option<Instant> {
    let budget = budget(request_timeout, incoming)?;
    // A budget of centuries must not overflow `Instant` arithmetic.
    Some(arrived() + budget.min(Duration::from_secs(365 * 24 * 3600)))
}

/// A request's whole time budget: the smaller of the policy's request timeout (`0s`:
/// none) and the caller's; `None` when it has neither.
pub fn budget(request_timeout: Duration, incoming: Option<Duration>) -> Option<Duration> {
    match (
        (!request_timeout.is_zero()).then_some(request_timeout),
        incoming,
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(a),
        (None, None) => None,
    }
}

/// Waits an injected delay; `Err` (`deadline-exceeded`, naming `budget`) when the
/// deadline comes first, at the deadline.
pub async fn wait(
    delay: Duration,
    deadline: Option<Instant>,
    budget: Duration,
) -> Result<(), crate::error::ProxyError> {
    match deadline {
        Some(d) if Instant::now() + delay >= d => {
            tokio::time::sleep_until(d).await;
            Err(crate::error::ProxyError::DeadlineExceeded { budget })
        }
        _ => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
    }
}

/// What is left of a deadline now (zero once it has passed).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        for (text, d) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(parse_grpc_timeout(text.as_bytes()), Some(d), "{text}");
        }
        for bad in ["", "S", "100", "123456789S", "1s", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn formatting_round_trips_without_growing() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(1500),
            Duration::from_secs(86_400),
            Duration::from_secs(10 * 365 * 86_400),
        ] {
            let text = format_grpc_timeout(d);
            let back = parse_grpc_timeout(text.as_bytes()).unwrap();
            assert!(back >= d, "{d:?} -> {text}");
            assert!(text.len() <= 9, "{text}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_millis(1500)), "1500000u");
    }

    #[test]
    fn the_earliest_budget_wins() {
        let t = Instant::now();
        let at = || t;
        let unread = || -> Instant { panic!("no budget: the clock is not read") };
        assert_eq!(deadline(unread, Duration::ZERO, None), None);
        let d = deadline(at, Duration::from_secs(5), Some(Duration::from_secs(2)));
        assert_eq!(d, Some(t + Duration::from_secs(2)));
        let d = deadline(at, Duration::from_secs(1), Some(Duration::from_secs(2)));
        assert_eq!(d, Some(t + Duration::from_secs(1)));
        let d = deadline(at, Duration::from_secs(3), None);
        assert_eq!(d, Some(t + Duration::from_secs(3)));
        assert_eq!(parse_timeout_ms(b"1500"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout_ms(b"15x"), None);
    }
}
