//! A counting gate that admits waiters by priority (lower first, as REAPI's
//! `ExecutionPolicy.priority`), then in arrival order: what a FIFO semaphore
//! in front of a fixed number of slots cannot do.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// At most `n` holders at once; the best waiter goes next.
pub struct PriorityGate {
    inner: Mutex<Inner>,
}

struct Inner {
    free: usize,
    arrivals: u64,
    waiting: BinaryHeap<Waiter>,
}

struct Waiter {
    priority: i32,
    arrival: u64,
    wake: oneshot::Sender<()>,
}

impl Waiter {
    fn key(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}

// The heap pops its greatest element: the lowest priority value, then the
// earliest arrival, must be the greatest.
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Waiter {}

/// A place held in the gate; dropping it admits the next waiter.
pub struct Permit {
    gate: Arc<PriorityGate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// A waiter that gave up (its future was dropped) after it was admitted
/// passes its place on.
struct Waiting {
    wake: Option<oneshot::Receiver<()>>,
    gate: Arc<PriorityGate>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut wake) = self.wake.take() {
            wake.close();
            if wake.try_recv().is_ok() {
                self.gate.release();
            }
        }
    }
}

impl PriorityGate {
    /// A gate with `n` places (at least one).
    pub fn new(n: usize) -> Arc<Self> {
        let inner = Inner { free: n.max(1), arrivals: 0, waiting: BinaryHeap::new() };
        Arc::new(PriorityGate { inner: Mutex::new(inner) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a place: at once if one is free and nobody waits, else
    /// after every waiter with a lower priority value or the same one and an
    /// earlier arrival.
    pub async fn acquire(self: &Arc<Self>, priority: i32) -> Permit {
        let wake = {
            let mut inner = self.lock();
            if inner.free > 0 && inner.waiting.is_empty() {
                inner.free -= 1;
                return Permit { gate: self.clone() };
            }
            let (wake, woken) = oneshot::channel();
            inner.arrivals += 1;
            let arrival = inner.arrivals;
            inner.waiting.push(Waiter { priority, arrival, wake });
            woken
        };
        let mut waiting = Waiting { wake: Some(wake), gate: self.clone() };
        let woken = waiting.wake.as_mut().expect("set above").await;
        waiting.wake = None;
        // The sender lives in the heap until it is used, and the gate lives
        // as long as this Arc: a closed channel cannot happen.
        debug_assert!(woken.is_ok());
        Permit { gate: self.clone() }
    }

    /// Hands a freed place to the best waiter still waiting, or frees it.
    fn release(&self) {
        let mut inner = self.lock();
        while let Some(waiter) = inner.waiting.pop() {
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        inner.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_are_admitted_by_priority_then_arrival() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(0).await;
        let (admitted_tx, mut admitted) = tokio::sync::mpsc::unbounded_channel();
        for (label, priority) in [("low", 5), ("high", -1), ("mid", 2), ("high-later", -1)] {
            let (gate, admitted_tx) = (gate.clone(), admitted_tx.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire(priority).await;
                admitted_tx.send(label).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            });
            // Arrivals in this order.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(admitted.recv().await.unwrap());
        }
        assert_eq!(order, ["high", "high-later", "mid", "low"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_its_place() {
        let gate = PriorityGate::new(1);
        let held = gate.acquire(0).await;
        let quitter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(0).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        quitter.abort();
        let _ = quitter.await;
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), gate.acquire(0)).await;
        assert!(again.is_ok(), "the place came back");
    }
}
