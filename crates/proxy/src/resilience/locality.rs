//! Locality and priority levels (failover / takeover).
//!
//! An endpoint's level is how far it is from this sidecar ([`level`]); traffic is split
//! across levels the way Envoy splits it across priorities ([`shares`]): a level whose
//! available share `a/n` times the overprovisioning factor reaches 100% takes everything
//! that reaches it; a degraded level keeps what it can serve and the rest spills over to
//! the next, so a zone losing half its endpoints sheds load proportionally instead of all
//! at once, and takes it back as it heals.

use malla_core::{policy::Failover, Labels};

/// The level of an endpoint with `labels`, seen from a sidecar with `local` labels: one
/// step down for each locality label (broadest first) from the first that differs; the
/// endpoints not matching `prefer` come after all that do. A label this sidecar lacks
/// does not count as a difference.
pub fn level(local: &Labels, labels: &Labels, failover: &Failover) -> usize {
    if !failover.enabled {
        return 0;
    }
    let depth = failover.locality.len();
    let distance = failover
        .locality
        .iter()
        .position(|key| match local.get(key) {
            Some(mine) => labels.get(key) != Some(mine),
            None => false,
        })
        .map_or(0, |first_difference| depth - first_difference);
    let preferred = failover.prefer.as_ref().is_none_or(|s| s.matches(labels));
    distance + if preferred { 0 } else { depth + 1 }
}

/// The share of traffic for each level, given how many of its endpoints are available
/// and how many it has. Empty levels get nothing; the shares sum to 1 unless nothing at
/// all is available (then all zero).
pub fn shares(available: &[usize], totals: &[usize], overprovisioning: f64) -> Vec<f64> {
    let health: Vec<f64> = available
        .iter()
        .zip(totals)
        .map(|(&a, &n)| {
            if n == 0 {
                0.0
            } else {
                (overprovisioning * a as f64 / n as f64).min(1.0)
            }
        })
        .collect();
    // Envoy's normalised total health: when all levels together cannot carry 100%, each
    // level's health is scaled up so that the load still sums to 100%.
    let total: f64 = health.iter().sum::<f64>().min(1.0);
    if total == 0.0 {
        return vec![0.0; health.len()];
    }
    let mut remaining = 1.0f64;
    health
        .iter()
        .map(|h| {
            let share = (h / total).min(remaining);
            remaining -= share;
            share
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        let mut l = Labels::new();
        for (k, v) in pairs {
            l.insert(k, v).unwrap();
        }
        l
    }

    #[test]
    fn levels_follow_locality_then_preference() {
        let f = Failover {
            prefer: Some("env=prod".parse().unwrap()),
            ..Failover::default()
        };
        let me = labels(&[("region", "eu"), ("zone", "eu-1")]);
        let at = |pairs: &[(&str, &str)]| level(&me, &labels(pairs), &f);
        assert_eq!(
            at(&[("region", "eu"), ("zone", "eu-1"), ("env", "prod")]),
            0
        );
        assert_eq!(
            at(&[("region", "eu"), ("zone", "eu-2"), ("env", "prod")]),
            1
        );
        assert_eq!(
            at(&[("region", "us"), ("zone", "us-1"), ("env", "prod")]),
            2
        );
        assert_eq!(at(&[("env", "prod")]), 2, "unlabelled endpoints are far");
        assert_eq!(
            at(&[("region", "eu"), ("zone", "eu-1")]),
            3,
            "not preferred"
        );
        // A sidecar without locality labels sees one level.
        assert_eq!(level(&Labels::new(), &labels(&[("zone", "x")]), &f), 3);
        assert_eq!(
            level(
                &Labels::new(),
                &labels(&[("zone", "x"), ("env", "prod")]),
                &f
            ),
            0
        );
    }

    #[test]
    fn traffic_spills_over_proportionally() {
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        // Healthy local level: everything stays local.
        assert!(close(&shares(&[10, 10], &[10, 10], 1.4), &[1.0, 0.0]));
        // 80% available × 1.4 ≥ 100%: still all local.
        assert!(close(&shares(&[8, 10], &[10, 10], 1.4), &[1.0, 0.0]));
        // 50% × 1.4 = 70% local, 30% spills over.
        assert!(close(&shares(&[5, 10], &[10, 10], 1.4), &[0.7, 0.3]));
        // Local level gone: all remote.
        assert!(close(&shares(&[0, 10], &[10, 10], 1.4), &[0.0, 1.0]));
        // Both degraded: normalised so the load still sums to 100%.
        let s = shares(&[2, 2], &[10, 10], 1.4);
        assert!(close(&s, &[0.5, 0.5]), "{s:?}");
        assert!(close(&shares(&[0, 0], &[1, 1], 1.4), &[0.0, 0.0]));
    }
}
