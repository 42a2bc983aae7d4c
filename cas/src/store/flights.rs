//! Single-flight: concurrent requests for the same key share one piece of
//! work. The work runs as a task of its own, so it completes (and fills
//! whatever cache it fills) even if every caller that waited on it gives up.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::store::StoreError;

type Flight<T> = Shared<BoxFuture<'static, Result<T, StoreError>>>;

/// Work in progress, by key.
pub struct Flights<K, T> {
    running: Arc<Mutex<HashMap<K, Flight<T>>>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights { running: Arc::default() }
    }
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// The outcome of `work` for `key`, joining the run already in progress
    /// for it if there is one (then `work` is dropped unused). Needs a tokio
    /// runtime.
    pub async fn run<F>(&self, key: K, work: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let flight = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running
                .entry(key.clone())
                .or_insert_with(|| {
                    let running = self.running.clone();
                    let task = tokio::spawn(async move {
                        let result = work.await;
                        running.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                        result
                    });
                    async move {
                        task.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("fetch task: {e}"))))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        flight.await
    }

    /// How many runs are in progress.
    pub fn in_flight(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_its_outcome() {
        let flights: Arc<Flights<u32, u64>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut callers = Vec::new();
        for _ in 0..8 {
            let (flights, runs, mut gate) = (flights.clone(), runs.clone(), gate.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run(7, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Ok(42)
                    })
                    .await
            }));
        }
        while flights.in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release.send(true).unwrap();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap(), 42);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for eight callers");
        assert_eq!(flights.in_flight(), 0, "a finished run is forgotten");

        // A failure reaches every waiter, and the next call runs again.
        let failed = flights.run(7, async { Err(StoreError::Unavailable("down".into())) }).await;
        assert!(matches!(failed, Err(StoreError::Unavailable(m)) if m == "down"));
        assert_eq!(flights.run(7, async { Ok(1) }).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_run_completes_when_its_caller_gives_up() {
        let flights: Flights<u32, ()> = Flights::default();
        let done = Arc::new(AtomicUsize::new(0));
        let finished = done.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(10),
            flights.run(1, async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
    }
}
