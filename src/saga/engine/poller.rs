//! Finding work: the poller claims due sagas (woken by a timer, by NOTIFY `due`, or its polling
//! interval) with `FOR UPDATE SKIP LOCKED` and spawns a session for each; the listener follows
//! the wake-up channel for other instances' news; a lease is given back at shutdown.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::Inner;
use crate::saga::machine::Saga;
use crate::saga::store;
use crate::wake::{self, Wake};

impl Inner {
    pub(super) async fn give_back(&self, saga: &Saga) {
        if let Ok(mut conn) = self.pool.acquire().await {
            let _ = store::release_lease(&mut conn, saga.id, saga.fence).await;
        }
    }

    pub(super) fn wake_at(self: &Arc<Self>, at: OffsetDateTime) {
        let delay = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let delay = Duration::from_secs_f64(delay.as_seconds_f64()) + Duration::from_millis(2);
        let i = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => i.wake.notify_one(),
                _ = i.shutdown.cancelled() => {}
            }
        });
    }

    pub(super) async fn poll_loop(self: Arc<Self>) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let free = self.in_flight.available_permits().min(256);
            let mut claimed = 0;
            if free > 0 {
                match self.pool.acquire().await {
                    Ok(mut conn) => {
                        match store::claim_due(&mut conn, &self.cfg.worker_id, self.cfg.lease, free as i64)
                            .await
                        {
                            Ok(sagas) => {
                                drop(conn);
                                claimed = sagas.len();
                                for s in sagas {
                                    match self.in_flight.clone().try_acquire_owned() {
                                        Ok(p) => self.clone().spawn_drive(s, p),
                                        Err(_) => self.give_back(&s).await,
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "claiming due sagas failed"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "saga poller: database unavailable"),
                }
            }
            if claimed > 0 && claimed == free {
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
    }

    pub(super) async fn listen_loop(self: Arc<Self>) {
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&self.pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "saga listener: cannot connect");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if listener.listen(wake::CHANNEL).await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                let n = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    n = listener.recv() => n,
                };
                match n {
                    Ok(n) => {
                        // A saga this process drove has woken its waiters already, with the
                        // answer; only another worker's news is read here.
                        match Wake::parse(n.payload()) {
                            Some(Wake::Finished { saga_id, worker }) if worker != self.cfg.worker_id => {
                                self.waiters.finished_elsewhere(saga_id)
                            }
                            Some(Wake::Due) => self.wake.notify_one(),
                            _ => {}
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
