//! Outcome conditions: which results of a call count as a failure (for the outlier
//! detector) or deserve another try (for retries).
//!
//! A condition list is written as strings: `connect-failure`, `reset`, `timeout`, `5xx`,
//! `gateway-error` (502, 503 and 504), a status code (`"503"`), or a gRPC status by name
//! (`grpc-unavailable`, `grpc-internal`, ...). It is held as bitsets so that classifying a
//! response on the hot path is a shift and a mask.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How one attempt ended, as far as resilience is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No connection could be made: the request never left.
    ConnectFailure,
    /// The connection closed or was reset before a response head.
    Reset,
    /// No response head within the per-try timeout.
    Timeout,
    /// A response with this status (for gRPC: the HTTP status, usually 200).
    Status(u16),
    /// A gRPC call that ended with this `grpc-status`.
    Grpc(u8),
}

impl Outcome {
    /// A success for the outlier detector's success rate (any gRPC OK and any status
    /// below 500 answered by the endpoint).
    pub fn is_success(self) -> bool {
        match self {
            Outcome::Status(s) => s < 500,
            Outcome::Grpc(code) => code == 0,
            _ => false,
        }
    }
}

/// gRPC status codes by their canonical names (grpc/doc/statuscodes.md), lower-case with
/// dashes.
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

pub fn grpc_code_name(code: u8) -> &'static str {
    GRPC_CODES
        .get(usize::from(code))
        .copied()
        .unwrap_or("unknown")
}

/// A set of [`Outcome`] conditions.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Conditions {
    connect_failure: bool,
    reset: bool,
    timeout: bool,
    /// Bit `s - 100` for each status `s` in 100..=599 that matches.
    statuses: [u64; 8],
    /// Bit `code` for each gRPC status that matches.
    grpc: u32,
    /// The list as written, for serialization and display.
    written: Vec<String>,
}

impl Conditions {
    pub fn matches(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::ConnectFailure => self.connect_failure,
            Outcome::Reset => self.reset,
            Outcome::Timeout => self.timeout,
            Outcome::Status(s) => match s.checked_sub(100) {
                Some(bit) if bit < 512 => {
                    self.statuses[usize::from(bit / 64)] & (1 << (bit % 64)) != 0
                }
                _ => false,
            },
            Outcome::Grpc(code) => code < 32 && self.grpc & (1 << code) != 0,
        }
    }

    /// Whether any gRPC status is listed.
    pub fn has_grpc(&self) -> bool {
        self.grpc != 0
    }

    fn add_status(&mut self, status: u16) {
        let bit = status - 100;
        self.statuses[usize::from(bit / 64)] |= 1 << (bit % 64);
    }

    fn add(&mut self, item: &str) -> Result<(), String> {
        match item {
            "connect-failure" => self.connect_failure = true,
            "reset" => self.reset = true,
            "timeout" => self.timeout = true,
            "5xx" => (500..=599).for_each(|s| self.add_status(s)),
            "gateway-error" => [502, 503, 504].into_iter().for_each(|s| self.add_status(s)),
            _ => {
                if let Some(name) = item.strip_prefix("grpc-") {
                    let code = GRPC_CODES
                        .iter()
                        .position(|c| *c == name && *c != "ok")
                        .ok_or_else(|| {
                            format!(
                                "unknown gRPC status {name:?}; use one of {}",
                                GRPC_CODES[1..].join(", ")
                            )
                        })?;
                    self.grpc |= 1 << code;
                } else {
                    let status: u16 = item.parse().map_err(|_| {
                        format!(
                            "unknown condition {item:?}; use connect-failure, reset, timeout, 5xx, \
                             gateway-error, a status code such as \"503\", or grpc-<status> such as grpc-unavailable"
                        )
                    })?;
                    if !(100..=599).contains(&status) {
                        return Err(format!("status {status} is not between 100 and 599"));
                    }
                    self.add_status(status);
                }
            }
        }
        self.written.push(item.to_string());
        Ok(())
    }

    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut set = Conditions::default();
        for item in items {
            set.add(item.as_ref())?;
        }
        Ok(set)
    }
}

impl fmt::Debug for Conditions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.written).finish()
    }
}

impl Serialize for Conditions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.written.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Conditions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        Conditions::parse(&items).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_codes_and_grpc_names() {
        let c = Conditions::parse(&["connect-failure", "5xx", "429", "grpc-unavailable"]).unwrap();
        assert!(c.matches(Outcome::ConnectFailure));
        assert!(!c.matches(Outcome::Reset));
        assert!(c.matches(Outcome::Status(500)) && c.matches(Outcome::Status(599)));
        assert!(c.matches(Outcome::Status(429)));
        assert!(!c.matches(Outcome::Status(404)) && !c.matches(Outcome::Status(200)));
        assert!(c.matches(Outcome::Grpc(14)) && !c.matches(Outcome::Grpc(13)));
        assert!(!c.matches(Outcome::Status(99)) && !c.matches(Outcome::Status(1000)));
        let gw = Conditions::parse(&["gateway-error"]).unwrap();
        assert!(gw.matches(Outcome::Status(503)) && !gw.matches(Outcome::Status(500)));
    }

    #[test]
    fn bad_conditions_say_what_to_write() {
        for (bad, says) in [
            ("5xxx", "unknown condition"),
            ("grpc-unavail", "unknown gRPC status"),
            ("grpc-ok", "unknown gRPC status"),
            ("700", "between 100 and 599"),
        ] {
            let err = Conditions::parse(&[bad]).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
