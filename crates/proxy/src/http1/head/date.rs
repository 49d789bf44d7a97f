//! The `Date` a relayed response gets when its origin sent none (RFC 9110 §6.6.1: an
//! origin with a clock must send one; a proxy adds it when missing).
//!
//! Formatting an HTTP date costs far more than the rest of a head rewrite, so each worker
//! thread formats it once per second and copies the 29 bytes afterwards.

use std::{cell::RefCell, time::SystemTime};

/// `Sun, 06 Nov 1994 08:49:37 GMT`.
const LEN: usize = 29;

thread_local! {
    static CACHE: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
}

/// The current date in IMF-fixdate form.
pub(super) fn now() -> [u8; LEN] {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == LEN {
                cache.1.copy_from_slice(text.as_bytes());
                cache.0 = second;
            }
        }
        cache.1
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_parse_back() {
        let date = super::now();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        assert!(text.ends_with(" GMT"));
    }
}
