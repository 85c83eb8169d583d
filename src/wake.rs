//! The wake-up protocol between instances: one PostgreSQL NOTIFY channel and its payloads, built
//! and parsed here only. `finished:<saga uuid> <worker id>` (a saga reached its end: waiters
//! elsewhere read its row) and `due` (a saga became due: pollers look now).

use uuid::Uuid;

/// The `pg_notify` channel.
pub const CHANNEL: &str = "saga_events";

/// The payload of [`Wake::Due`].
pub const DUE: &str = "due";

/// One wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake<'a> {
    /// A saga finished, written by `worker`.
    Finished {
        /// The saga.
        saga_id: Uuid,
        /// The worker that wrote its end.
        worker: &'a str,
    },
    /// A saga became due.
    Due,
}

impl<'a> Wake<'a> {
    /// The payload to send.
    pub fn payload(&self) -> String {
        match self {
            Wake::Finished { saga_id, worker } => format!("finished:{saga_id} {worker}"),
            Wake::Due => DUE.to_string(),
        }
    }

    /// Reads a payload; None for one this release does not send.
    pub fn parse(payload: &'a str) -> Option<Wake<'a>> {
        if payload == DUE {
            return Some(Wake::Due);
        }
        let rest = payload.strip_prefix("finished:")?;
        let (id, worker) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Wake::Finished {
            saga_id: Uuid::parse_str(id).ok()?,
            worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_as_they_were_sent() {
        let id = Uuid::now_v7();
        let w = Wake::Finished {
            saga_id: id,
            worker: "host-1-ab",
        };
        assert_eq!(w.payload(), format!("finished:{id} host-1-ab"));
        assert_eq!(Wake::parse(&w.payload()), Some(w));
        assert_eq!(Wake::parse("due"), Some(Wake::Due));
        assert_eq!(Wake::parse("finished:not-a-uuid w"), None);
        assert_eq!(Wake::parse("hello"), None);
    }
}
