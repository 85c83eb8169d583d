//! The in-process wake-ups of `POST /orders` (and of a cancellation): a request registers before
//! its saga can finish and is woken when the committer writes the end, with the answer; news that
//! another instance finished the saga wakes it without one (it reads the row).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::Finished;
use crate::saga::machine::SagaState;

/// Who waits for which saga.
#[derive(Default)]
pub(super) struct Waiters(Mutex<HashMap<Uuid, Vec<oneshot::Sender<Finished>>>>);

impl Waiters {
    /// Registers interest in `saga_id` finishing.
    pub(super) fn register(&self, saga_id: Uuid) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        self.0
            .lock()
            .expect("waiters")
            .entry(saga_id)
            .or_default()
            .push(tx);
        rx
    }

    /// Drops the waiters of `saga_id` that gave up.
    pub(super) fn forget(&self, saga_id: Uuid) {
        let mut w = self.0.lock().expect("waiters");
        if let Some(list) = w.get_mut(&saga_id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(&saga_id);
            }
        }
    }

    /// This process wrote the saga's end: wakes its waiters with the answer.
    pub(super) fn finished(&self, saga_id: Uuid, state: SagaState, answer: Option<serde_json::Value>) {
        let list = self.0.lock().expect("waiters").remove(&saga_id);
        for w in list.into_iter().flatten() {
            let _ = w.send(Finished {
                state,
                answer: answer.clone(),
            });
        }
    }

    /// Another instance finished the saga: its waiters (if any here) read the row.
    pub(super) fn finished_elsewhere(&self, saga_id: Uuid) {
        let list = self.0.lock().expect("waiters").remove(&saga_id);
        for w in list.into_iter().flatten() {
            let _ = w.send(Finished {
                state: SagaState::Completed,
                answer: None,
            });
        }
    }
}
