//! The in-memory lease schedule the writer owns.
//!
//! Deadlines are `tokio::time::Instant`s so that paused-time tests drive expiry; the
//! `leases` table keeps the same deadline as wall-clock unix milliseconds so that a restart
//! resumes each lease with its remaining time. While the store runs, this schedule is the
//! authority; the table is read only when the store opens.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::LeaseId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeaseState {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
}

/// The previous state of every lease a batch changed, newest last, to undo the batch if
/// its transaction fails.
pub(super) type Undo = Vec<(LeaseId, Option<LeaseState>)>;

#[derive(Default)]
pub(super) struct Leases {
    by_id: HashMap<LeaseId, LeaseState>,
    by_deadline: BTreeSet<(Instant, LeaseId)>,
}

impl Leases {
    pub(super) fn get(&self, id: LeaseId) -> Option<LeaseState> {
        self.by_id.get(&id).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Sets (or with `None` removes) a lease, remembering its previous state in `undo`.
    pub(super) fn set(&mut self, id: LeaseId, state: Option<LeaseState>, undo: &mut Undo) {
        let old = self.replace(id, state);
        undo.push((id, old));
    }

    /// Restores the states recorded in `undo`.
    pub(super) fn rollback(&mut self, undo: Undo) {
        for (id, old) in undo.into_iter().rev() {
            self.replace(id, old);
        }
    }

    fn replace(&mut self, id: LeaseId, state: Option<LeaseState>) -> Option<LeaseState> {
        let old = match state {
            Some(state) => {
                self.by_deadline.insert((state.deadline, id));
                self.by_id.insert(id, state)
            }
            None => self.by_id.remove(&id),
        };
        if let Some(old) = old {
            if Some(old.deadline) != state.map(|s| s.deadline) {
                self.by_deadline.remove(&(old.deadline, id));
            }
        }
        old
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(deadline, _)| *deadline)
    }

    /// The leases whose deadline is at or before `now`.
    pub(super) fn due(&self, now: Instant) -> Vec<LeaseId> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, id)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_undo() {
        let t0 = Instant::now();
        let at = |s| LeaseState {
            ttl: Duration::from_secs(10),
            deadline: t0 + Duration::from_secs(s),
        };
        let mut leases = Leases::default();
        let mut undo = Undo::new();
        leases.set(1, Some(at(10)), &mut undo);
        leases.set(2, Some(at(5)), &mut undo);
        assert_eq!(leases.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(leases.due(t0 + Duration::from_secs(7)), vec![2]);

        let mut undo = Undo::new();
        leases.set(2, Some(at(20)), &mut undo);
        leases.set(1, None, &mut undo);
        assert_eq!(leases.due(t0 + Duration::from_secs(30)), vec![2]);
        assert_eq!(leases.len(), 1);
        leases.rollback(undo);
        assert_eq!(leases.get(1), Some(at(10)));
        assert_eq!(leases.get(2), Some(at(5)));
        assert_eq!(leases.due(t0 + Duration::from_secs(30)), vec![2, 1]);
        assert_eq!(leases.by_deadline.len(), 2);
    }
}
