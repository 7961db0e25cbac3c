//! Liveness and readiness, reported by the sync loop and read by `/healthz` and `/readyz`.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// A cloneable handle: the sync loop calls [`Health::beat`] on every iteration (including idle
/// wake-ups) and [`Health::set_ready`] once the first snapshot is enforced; the HTTP server reads
/// it.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Origin of the heartbeat clock. A monotonic clock, so wall-clock jumps cannot fake liveness.
    start: Instant,
    /// Milliseconds after `start` of the latest heartbeat.
    last_beat_ms: AtomicU64,
    ready: AtomicBool,
    stale_after: Duration,
}

/// Result of a liveness check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The sync loop reported within the allowed age.
    Alive {
        /// Time since the last heartbeat.
        age: Duration,
    },
    /// The sync loop has not reported for longer than the allowed age.
    Stale {
        /// Time since the last heartbeat.
        age: Duration,
        /// The allowed age.
        limit: Duration,
    },
}

fn millis(d: Duration) -> u64 {
    // Saturates after ~585 million years of uptime.
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Health {
    /// A handle that reports stale once no heartbeat arrived for longer than `stale_after`. The
    /// creation counts as the first heartbeat, so the loop has `stale_after` to start.
    pub fn new(stale_after: Duration) -> Self {
        Health {
            inner: Arc::new(Inner {
                start: Instant::now(),
                last_beat_ms: AtomicU64::new(0),
                ready: AtomicBool::new(false),
                stale_after,
            }),
        }
    }

    /// Records a heartbeat now.
    pub fn beat(&self) {
        let now = millis(self.inner.start.elapsed());
        // `fetch_max`: two racing callers can never move the heartbeat backwards.
        self.inner.last_beat_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Marks the agent ready: the first snapshot is enforced. Readiness is never withdrawn; a
    /// stalled loop shows up in liveness instead.
    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Release);
    }

    /// `true` once [`Health::set_ready`] was called.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Liveness now.
    pub fn liveness(&self) -> Liveness {
        self.liveness_at(Instant::now())
    }

    /// Liveness at `now` (an instant after the handle was created); separate for tests.
    fn liveness_at(&self, now: Instant) -> Liveness {
        let now_ms = millis(now.saturating_duration_since(self.inner.start));
        let beat_ms = self.inner.last_beat_ms.load(Ordering::Relaxed);
        let age = Duration::from_millis(now_ms.saturating_sub(beat_ms));
        if age > self.inner.stale_after {
            Liveness::Stale { age, limit: self.inner.stale_after }
        } else {
            Liveness::Alive { age }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_after_the_limit_and_alive_again_after_a_beat() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = h.inner.start;
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(10)),
            Liveness::Alive { age: Duration::from_secs(10) }
        );
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(30)),
            Liveness::Alive { age: Duration::from_secs(30) }
        );
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(31)),
            Liveness::Stale { age: Duration::from_secs(31), limit: Duration::from_secs(30) }
        );
        // A beat at t0+20 s (simulated by storing it) makes t0+31 s alive again.
        h.inner.last_beat_ms.store(20_000, Ordering::Relaxed);
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(31)),
            Liveness::Alive { age: Duration::from_secs(11) }
        );
        // Heartbeats never move backwards.
        h.beat();
        assert_eq!(h.inner.last_beat_ms.load(Ordering::Relaxed), 20_000);
    }

    #[test]
    fn ready_only_after_set_ready_and_shared_between_clones() {
        let h = Health::new(Duration::from_secs(1));
        let clone = h.clone();
        assert!(!h.is_ready());
        clone.set_ready();
        assert!(h.is_ready());
    }
}
