//! Waiting for a condition instead of sleeping.
//!
//! A test never sleeps for a fixed time hoping something happened; it polls the condition
//! with [`assert_eventually!`](crate::assert_eventually), a bounded number of times with a
//! short pause between tries, and fails with a message when the condition never holds.

use std::time::Duration;

/// Pause between two tries.
pub const PAUSE: Duration = Duration::from_millis(20);
/// Tries before giving up: 500 × 20 ms ≈ 10 s, generous for a loaded 2-core machine.
pub const TRIES: usize = 500;

/// Sleeps [`PAUSE`] (used by the macro between tries).
pub async fn pause() {
    tokio::time::sleep(PAUSE).await;
}

/// Polls `cond` (an expression, which may `.await`) until it is true, at most
/// [`TRIES`](crate::eventually::TRIES) times (or `tries: N`), pausing between tries; panics
/// with the message (or the condition's text) if it never holds.
///
/// ```ignore
/// assert_eventually!(peer.requests() == 1);
/// assert_eventually!(admin::ready(addr).await == 503, "ready never turned 503");
/// assert_eventually!(tries: 50, conn.is_closed(), "still open");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (tries: $tries:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(tries: $tries, $cond, "condition never held: {}", stringify!($cond))
    };
    (tries: $tries:expr, $cond:expr, $($msg:tt)+) => {{
        let mut held = false;
        for _ in 0..$tries {
            if $cond {
                held = true;
                break;
            }
            $crate::eventually::pause().await;
        }
        assert!(held, $($msg)+);
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(tries: $crate::eventually::TRIES, $cond)
    };
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(tries: $crate::eventually::TRIES, $cond, $($msg)+)
    };
}
