//! Fault injection for chaos tests: a share of requests is delayed, a share aborted with a
//! chosen status, before they reach any endpoint (Envoy's and Istio's fault filters).

use std::time::Duration;

use malla_core::policy::Fault;

#[derive(Debug)]
pub struct FaultRule {
    pub path_prefix: Option<String>,
    delay_fraction: f64,
    delay: Duration,
    abort_fraction: f64,
    pub abort_status: u16,
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

impl FaultRule {
    pub fn new(fault: &Fault) -> Self {
        FaultRule {
            path_prefix: fault.path_prefix.clone(),
            delay_fraction: fault.delay_percent.fraction(),
            delay: fault.delay,
            abort_fraction: fault.abort_percent.fraction(),
            abort_status: fault.abort_status,
        }
    }

    fn applies_to(&self, path: &[u8]) -> bool {
        self.path_prefix
            .as_ref()
            .is_none_or(|p| path.starts_with(p.as_bytes()))
    }

    /// Draws the faults for one request.
    pub fn draw(&self, path: &[u8]) -> Injected {
        if !self.applies_to(path) {
            return Injected::default();
        }
        Injected {
            delay: (self.delay_fraction > 0.0 && fastrand::f64() < self.delay_fraction)
                .then_some(self.delay),
            abort: (self.abort_fraction > 0.0 && fastrand::f64() < self.abort_fraction)
                .then_some(self.abort_status),
        }
    }
}

/// The faults of the first rule that applies to `path` and injects something.
pub fn draw(rules: &[FaultRule], path: &[u8]) -> Injected {
    rules
        .iter()
        .map(|r| r.draw(path))
        .find(|i| i.delay.is_some() || i.abort.is_some())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_core::policy::Percent;

    #[test]
    fn shares_are_honoured() {
        let rule = FaultRule::new(&Fault {
            path_prefix: Some("/x".into()),
            delay_percent: Percent::new(0.0).unwrap(),
            delay: Duration::ZERO,
            abort_percent: Percent::new(30.0).unwrap(),
            abort_status: 503,
        });
        let aborted = (0..10_000)
            .filter(|_| rule.draw(b"/x/y").abort == Some(503))
            .count();
        assert!((2_700..3_300).contains(&aborted), "{aborted}");
        assert_eq!(rule.draw(b"/other"), Injected::default());
    }
}
