//! The step registry: every action and compensation the binary can run, under the name that is
//! persisted with each saga (never renamed). A saga definition (`sagas/*.toml`) names its steps;
//! the engine resolves them here once at startup and dispatches by what it resolved, so a new step
//! or a new saga registers its handlers and needs no edit of the engine.
//!
//! A handler runs either remotely (a downstream call, no database connection held, its outcome
//! recorded in a later shared commit) or locally (inside the shared commit's transaction, so its
//! rows commit with the transition that ran it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::saga::definition::{DefinitionError, SagaDef};
use crate::saga::machine::{Outcome, Saga, StepShape};

/// The Idempotency-Key of a step's action or compensation: the same for every attempt, so a retry
/// or a resumed saga never acts twice.
pub fn idempotency_key(saga_id: uuid::Uuid, name: &str) -> String {
    format!("saga-{saga_id}-{name}")
}

/// What a remote handler's run resolves to.
pub type RemoteRun<'a> = BoxFuture<'a, Outcome>;

/// What a local handler's run resolves to.
pub type LocalRun<'a> = BoxFuture<'a, Result<Outcome, sqlx::Error>>;

/// What a local handler's run over several sagas resolves to: one outcome per saga, in order.
pub type LocalRunMany<'a> = BoxFuture<'a, Result<Vec<Outcome>, sqlx::Error>>;

/// An action or compensation that calls a downstream service.
pub trait RemoteStep: Send + Sync {
    /// Runs one attempt; `timeout` bounds the call (the definition's `attempt_timeout_ms`).
    fn run<'a>(&'a self, saga: &'a Saga, timeout: Duration) -> RemoteRun<'a>;
}

/// An action or compensation that runs in the transaction recording the previous outcome.
pub trait LocalStep: Send + Sync {
    /// Runs once in `conn`'s transaction; a database error sinks the whole commit (retried).
    fn run<'a>(&'a self, conn: &'a mut PgConnection, saga: &'a Saga) -> LocalRun<'a>;

    /// Runs once for each of `sagas` (the sagas of one shared commit due to run this step) in
    /// `conn`'s transaction; the outcomes in the order of `sagas`. A step written for throughput
    /// does all of them in one statement; by default they run one after another.
    fn run_many<'a>(&'a self, conn: &'a mut PgConnection, sagas: &'a [&'a Saga]) -> LocalRunMany<'a> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(sagas.len());
            for saga in sagas {
                out.push(self.run(&mut *conn, saga).await?);
            }
            Ok(out)
        })
    }
}

/// A registered handler.
#[derive(Clone)]
pub enum Handler {
    /// Runs without a database connection.
    Remote(Arc<dyn RemoteStep>),
    /// Runs in the shared commit's transaction.
    Local(Arc<dyn LocalStep>),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_local() {
            "Handler::Local"
        } else {
            "Handler::Remote"
        })
    }
}

impl Handler {
    fn is_local(&self) -> bool {
        matches!(self, Handler::Local(_))
    }
}

/// Handlers by persisted name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Handler>,
}

/// One step of a definition, resolved: its names and shape, and its two handlers.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Names and where each half runs.
    pub shape: StepShape,
    /// The action's handler.
    pub action: Handler,
    /// The compensation's handler.
    pub compensation: Handler,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a remote handler under its persisted name.
    ///
    /// # Panics
    /// When the name is registered already (two handlers for one persisted name is a bug).
    pub fn remote(&mut self, name: &'static str, step: impl RemoteStep + 'static) -> &mut Self {
        self.insert(name, Handler::Remote(Arc::new(step)))
    }

    /// Registers a local handler under its persisted name.
    ///
    /// # Panics
    /// When the name is registered already.
    pub fn local(&mut self, name: &'static str, step: impl LocalStep + 'static) -> &mut Self {
        self.insert(name, Handler::Local(Arc::new(step)))
    }

    fn insert(&mut self, name: &'static str, h: Handler) -> &mut Self {
        let previous = self.handlers.insert(name, h);
        assert!(previous.is_none(), "step {name:?} registered twice");
        self
    }

    /// The handler registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.handlers.get(name)
    }

    fn entry(&self, name: &str) -> Option<(&'static str, &Handler)> {
        self.handlers.get_key_value(name).map(|(k, h)| (*k, h))
    }

    /// Resolves every step of `def` (in its order): each action and compensation must be
    /// registered, else the definition cannot run on this binary.
    pub fn resolve(&self, def: &SagaDef, file: &str) -> Result<Vec<Resolved>, DefinitionError> {
        let missing = |at: String, name: &str| DefinitionError {
            file: file.to_string(),
            message: format!("{at} is {name:?}: this binary has no step registered under that name"),
        };
        def.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (action_name, action) = self
                    .entry(&s.name)
                    .ok_or_else(|| missing(format!("steps[{i}].name"), &s.name))?;
                let (compensation_name, compensation) = self
                    .entry(&s.compensation)
                    .ok_or_else(|| missing(format!("steps[{i}].compensation"), &s.compensation))?;
                Ok(Resolved {
                    shape: StepShape {
                        action: action_name,
                        compensation: compensation_name,
                        local_action: action.is_local(),
                        local_compensation: compensation.is_local(),
                    },
                    action: action.clone(),
                    compensation: compensation.clone(),
                })
            })
            .collect()
    }
}
