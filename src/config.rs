//! Configuration: every setting is an environment variable and a flag of the same meaning
//! (`DATABASE_URL` / `--database-url`). The effective values are printed at startup with secrets
//! masked, and `validate_for_production` refuses settings that are only safe on a developer's machine.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// The JWT key `dev` uses when `JWT_SECRET` is not set. `serve` refuses it.
pub const DEV_JWT_SECRET: &str = "ostore-dev-only-jwt-secret-never-use-in-production";

/// The log format is telemetry's (so telemetry needs nothing of the configuration); it is a
/// setting too, so it is named here as well.
pub use crate::telemetry::LogFormat;

/// The database argument: every subcommand that reaches PostgreSQL flattens this one.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ostore"
    )]
    pub database_url: String,
}

/// The logging filter and the standard OpenTelemetry settings, as flags beside their variables.
/// The telemetry reads the variables (the OpenTelemetry SDK reads every other `OTEL_*` one, such as
/// `OTEL_EXPORTER_OTLP_HEADERS` or `OTEL_TRACES_SAMPLER`), so a value given as a flag is put in
/// the process's environment before anything starts ([`TelemetryArgs::export`]).
#[derive(Debug, Clone, Default, Args)]
pub struct TelemetryArgs {
    /// Log filter (`tracing` directives such as `info,sqlx=warn`); logs only, traces keep their own
    /// filter.
    #[arg(long, env = "RUST_LOG")]
    pub rust_log: Option<String>,
    /// OTLP endpoint traces and metrics are exported to (nothing is exported when unset); every other
    /// standard `OTEL_*` variable is honoured too.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// The service name the exported telemetry carries (default: the program's role, such as
    /// `ostore-orders`).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

impl TelemetryArgs {
    /// The values given, as `(VARIABLE, value)` pairs.
    pub fn given(&self) -> Vec<(&'static str, &str)> {
        [
            ("RUST_LOG", &self.rust_log),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &self.otel_exporter_otlp_endpoint),
            ("OTEL_SERVICE_NAME", &self.otel_service_name),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// Puts the values given as flags into the process's environment, where the telemetry and the
    /// OpenTelemetry SDK read them.
    ///
    /// # Safety
    /// Changing the environment is sound only while no other thread runs (one may read it at the
    /// same time): call it first thing in `main`, before any runtime or thread is started.
    pub unsafe fn export(&self) {
        for (k, v) in self.given() {
            // SAFETY: the caller guarantees that no other thread runs yet.
            unsafe { std::env::set_var(k, v) };
        }
    }
}

/// Settings shared by every role of the service.
#[derive(Debug, Clone, Args)]
pub struct ServiceConfig {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Largest number of pooled database connections.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// Address the API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// HS256 signing key for access tokens (raw bytes, at least 32). Required outside `dev`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// `iss` claim of issued access tokens (and the only one accepted).
    #[arg(long, env = "JWT_ISSUER", default_value = "ostore-orders")]
    pub jwt_issuer: String,

    /// `aud` claim of issued access tokens (and the only one accepted).
    #[arg(long, env = "JWT_AUDIENCE", default_value = "ostore")]
    pub jwt_audience: String,

    /// Lifetime of an access token, in seconds.
    #[arg(long, env = "ACCESS_TOKEN_TTL_SECONDS", default_value_t = 600)]
    pub access_token_ttl_seconds: u64,

    /// Lifetime of a refresh token, in seconds.
    #[arg(long, env = "REFRESH_TOKEN_TTL_SECONDS", default_value_t = 14 * 24 * 3600)]
    pub refresh_token_ttl_seconds: u64,

    /// Base URL of the Product Catalog service.
    #[arg(long, env = "CATALOG_URL", default_value = "http://127.0.0.1:8081")]
    pub catalog_url: String,

    /// Base URL of the Shipment Tracking service.
    #[arg(long, env = "SHIPMENTS_URL", default_value = "http://127.0.0.1:8082")]
    pub shipments_url: String,

    /// Kafka bootstrap servers (`host:port,...`). Under `dev`, unset means an embedded broker.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,

    /// How long `POST /orders` waits for its saga before answering 202, in milliseconds.
    #[arg(long, env = "ORDER_WAIT_MS", default_value_t = 3000)]
    pub order_wait_ms: u64,

    /// Multiplies every retry delay and cap of the saga definitions.
    #[arg(long, env = "SAGA_RETRY_SCALE", default_value_t = 1.0)]
    pub saga_retry_scale: f64,

    /// Login attempts allowed per account per minute.
    #[arg(long, env = "LOGIN_LIMIT_PER_ACCOUNT", default_value_t = 10)]
    pub login_limit_per_account: u32,

    /// Login attempts allowed per peer address per minute.
    #[arg(long, env = "LOGIN_LIMIT_PER_ADDRESS", default_value_t = 60)]
    pub login_limit_per_address: u32,

    /// Orders one user may place per minute; 0 turns the limit off.
    #[arg(long, env = "ORDER_LIMIT_PER_USER", default_value_t = 600)]
    pub order_limit_per_user: u32,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Logging filter and OpenTelemetry export.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// How long a worker's claim on a saga lasts without a write, in milliseconds.
    #[arg(long, env = "SAGA_LEASE_MS", default_value_t = 30_000)]
    pub saga_lease_ms: u64,

    /// Fallback interval of the saga poller, in milliseconds (it is also woken by timers and NOTIFY).
    #[arg(long, env = "SAGA_POLL_INTERVAL_MS", default_value_t = 500)]
    pub saga_poll_interval_ms: u64,

    /// Most sagas one process drives at once.
    #[arg(long, env = "SAGA_MAX_IN_FLIGHT", default_value_t = 2048)]
    pub saga_max_in_flight: usize,

    /// Committer tasks sharing saga commits, on a thread of their own, each with one connection of
    /// its own (beside `DATABASE_MAX_CONNECTIONS`). What queues while a commit runs waits for it
    /// (up to 5 ms) and rides in the next one, so commits grow with the load instead of competing
    /// for the same pages and locks; the second committer takes over only from a commit that
    /// stalls (docs/performance.md, findings 17, 27 and 29).
    #[arg(long, env = "SAGA_COMMITTERS", default_value_t = 2)]
    pub saga_committers: usize,

    /// How long the outbox keeps rows after the broker acknowledged them, in seconds (audit,
    /// debugging); 0 deletes each row as soon as it is acknowledged, which roughly doubles the
    /// relay's rate.
    #[arg(long, env = "OUTBOX_RETENTION_SECONDS", default_value_t = 86_400)]
    pub outbox_retention_seconds: u64,

    /// How long an Idempotency-Key of a finished order is kept, in seconds (7 days by default):
    /// within it a repeated request replays the first answer; after it the key is free again. Keys
    /// of sagas still running or stuck are kept whatever their age.
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600)]
    pub idempotency_key_retention_seconds: u64,

    /// How long the tracking consumer keeps retrying a TrackingEvent whose order is unknown (or
    /// still pending) before it dead-letters it, in seconds; 0 dead-letters such an event at once.
    #[arg(long, env = "TRACKING_UNKNOWN_ORDER_WINDOW_SECONDS", default_value_t = 300)]
    pub tracking_unknown_order_window_seconds: u64,

    /// First delay before a parked TrackingEvent is retried, in milliseconds (doubling after each
    /// retry up to `TRACKING_RETRY_MAX_DELAY_MS`).
    #[arg(long, env = "TRACKING_RETRY_INITIAL_DELAY_MS", default_value_t = 1_000)]
    pub tracking_retry_initial_delay_ms: u64,

    /// Longest delay between retries of a parked TrackingEvent, in milliseconds.
    #[arg(long, env = "TRACKING_RETRY_MAX_DELAY_MS", default_value_t = 30_000)]
    pub tracking_retry_max_delay_ms: u64,

    /// The ops console's link to a saga's trace: `{traceID}` is replaced by the trace id (Jaeger of
    /// docker-compose by default); empty shows the trace id without a link.
    #[arg(
        long,
        env = "TRACE_UI_URL",
        default_value = "http://127.0.0.1:16686/trace/{traceID}"
    )]
    pub trace_ui_url: String,

    /// Marks the ops console's session cookie `Secure` (set it when the console is served over
    /// HTTPS, directly or behind a proxy).
    #[arg(long, env = "CONSOLE_SECURE_COOKIE", default_value_t = false)]
    pub console_secure_cookie: bool,

    /// Kafka topic names.
    #[command(flatten)]
    pub topics: crate::topics::Topics,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "JWT_SECRET is not set: set it to a random key of at least 32 bytes (for example `openssl rand -base64 48`)"
    )]
    MissingJwtSecret,
    #[error("JWT_SECRET is {0} bytes long: set it to a random key of at least 32 bytes (256 bits)")]
    ShortJwtSecret(usize),
    #[error("JWT_SECRET is the development key: set JWT_SECRET to a key of your own outside `dev`")]
    DevJwtSecret,
    #[error("{name} is {value}: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

impl ServiceConfig {
    /// Checks the settings every role relies on; used by `serve` (strict) and `dev`.
    pub fn validate(&self, allow_dev_secret: bool) -> Result<(), ConfigError> {
        match self.jwt_secret.as_deref() {
            None if allow_dev_secret => {}
            None => return Err(ConfigError::MissingJwtSecret),
            Some(s) if s == DEV_JWT_SECRET && !allow_dev_secret => {
                return Err(ConfigError::DevJwtSecret);
            }
            Some(s) if s.len() < 32 => return Err(ConfigError::ShortJwtSecret(s.len())),
            Some(_) => {}
        }
        if !(self.saga_retry_scale.is_finite() && self.saga_retry_scale > 0.0) {
            return Err(ConfigError::Invalid {
                name: "SAGA_RETRY_SCALE",
                value: self.saga_retry_scale.to_string(),
                why: "it must be a positive number",
            });
        }
        if self.login_limit_per_account == 0 || self.login_limit_per_address == 0 {
            return Err(ConfigError::Invalid {
                name: "LOGIN_LIMIT_PER_ACCOUNT / LOGIN_LIMIT_PER_ADDRESS",
                value: "0".into(),
                why: "login limits must allow at least one attempt per minute",
            });
        }
        if self.access_token_ttl_seconds == 0 || self.refresh_token_ttl_seconds == 0 {
            return Err(ConfigError::Invalid {
                name: "ACCESS_TOKEN_TTL_SECONDS / REFRESH_TOKEN_TTL_SECONDS",
                value: "0".into(),
                why: "token lifetimes must be positive",
            });
        }
        if self.tracking_retry_initial_delay_ms == 0
            || self.tracking_retry_max_delay_ms < self.tracking_retry_initial_delay_ms
        {
            return Err(ConfigError::Invalid {
                name: "TRACKING_RETRY_INITIAL_DELAY_MS / TRACKING_RETRY_MAX_DELAY_MS",
                value: format!(
                    "{} / {}",
                    self.tracking_retry_initial_delay_ms, self.tracking_retry_max_delay_ms
                ),
                why: "the first delay must be positive and the longest at least as long",
            });
        }
        if self.saga_lease_ms < 1000 || self.saga_max_in_flight == 0 || self.saga_committers == 0 {
            return Err(ConfigError::Invalid {
                name: "SAGA_LEASE_MS / SAGA_MAX_IN_FLIGHT / SAGA_COMMITTERS",
                value: format!(
                    "{} / {} / {}",
                    self.saga_lease_ms, self.saga_max_in_flight, self.saga_committers
                ),
                why: "the lease must be at least 1000 ms, and the other two positive",
            });
        }
        if self.database_max_connections < 2 {
            return Err(ConfigError::Invalid {
                name: "DATABASE_MAX_CONNECTIONS",
                value: self.database_max_connections.to_string(),
                why: "the service needs at least 2 connections",
            });
        }
        Ok(())
    }

    /// The signing key in effect (the dev key when none is configured).
    pub fn jwt_key(&self) -> &[u8] {
        self.jwt_secret.as_deref().unwrap_or(DEV_JWT_SECRET).as_bytes()
    }

    /// How long `POST /orders` waits for its saga.
    pub fn order_wait(&self) -> Duration {
        Duration::from_millis(self.order_wait_ms)
    }

    /// How long the outbox keeps acknowledged rows (`OUTBOX_RETENTION_SECONDS`).
    pub fn outbox_retention(&self) -> Duration {
        Duration::from_secs(self.outbox_retention_seconds)
    }

    /// How long the tracking consumer retries an event whose order is unknown
    /// (`TRACKING_UNKNOWN_ORDER_WINDOW_SECONDS`).
    pub fn tracking_unknown_order_window(&self) -> Duration {
        Duration::from_secs(self.tracking_unknown_order_window_seconds)
    }

    /// The tracking consumer's first and longest delay between retries of a parked event
    /// (`TRACKING_RETRY_INITIAL_DELAY_MS`, `TRACKING_RETRY_MAX_DELAY_MS`).
    pub fn tracking_retry_delays(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.tracking_retry_initial_delay_ms),
            Duration::from_millis(self.tracking_retry_max_delay_ms),
        )
    }

    /// The effective settings as `(VARIABLE, value)` pairs with secrets masked.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
        vec![
            ("DATABASE_URL", mask_url_password(&self.database.database_url)),
            (
                "DATABASE_MAX_CONNECTIONS",
                self.database_max_connections.to_string(),
            ),
            ("LISTEN_ADDR", self.listen_addr.to_string()),
            (
                "JWT_SECRET",
                match &self.jwt_secret {
                    None => "(unset: development key)".into(),
                    Some(s) => format!("***** ({} bytes)", s.len()),
                },
            ),
            ("JWT_ISSUER", self.jwt_issuer.clone()),
            ("JWT_AUDIENCE", self.jwt_audience.clone()),
            (
                "ACCESS_TOKEN_TTL_SECONDS",
                self.access_token_ttl_seconds.to_string(),
            ),
            (
                "REFRESH_TOKEN_TTL_SECONDS",
                self.refresh_token_ttl_seconds.to_string(),
            ),
            ("CATALOG_URL", self.catalog_url.clone()),
            ("SHIPMENTS_URL", self.shipments_url.clone()),
            ("KAFKA_BOOTSTRAP_SERVERS", opt(&self.kafka_bootstrap_servers)),
            ("KAFKA_CLIENT_*", crate::kafka::client_properties().describe()),
            ("ORDER_WAIT_MS", self.order_wait_ms.to_string()),
            ("SAGA_RETRY_SCALE", self.saga_retry_scale.to_string()),
            (
                "LOGIN_LIMIT_PER_ACCOUNT",
                self.login_limit_per_account.to_string(),
            ),
            (
                "LOGIN_LIMIT_PER_ADDRESS",
                self.login_limit_per_address.to_string(),
            ),
            ("ORDER_LIMIT_PER_USER", self.order_limit_per_user.to_string()),
            ("LOG_FORMAT", format!("{:?}", self.log_format).to_lowercase()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| format!("(unset: {})", crate::telemetry::DEFAULT_LOG_FILTER)),
            ),
            ("SAGA_LEASE_MS", self.saga_lease_ms.to_string()),
            ("SAGA_POLL_INTERVAL_MS", self.saga_poll_interval_ms.to_string()),
            ("SAGA_MAX_IN_FLIGHT", self.saga_max_in_flight.to_string()),
            ("SAGA_COMMITTERS", self.saga_committers.to_string()),
            (
                "OUTBOX_RETENTION_SECONDS",
                self.outbox_retention_seconds.to_string(),
            ),
            (
                "IDEMPOTENCY_KEY_RETENTION_SECONDS",
                self.idempotency_key_retention_seconds.to_string(),
            ),
            (
                "TRACKING_UNKNOWN_ORDER_WINDOW_SECONDS",
                self.tracking_unknown_order_window_seconds.to_string(),
            ),
            (
                "TRACKING_RETRY_INITIAL_DELAY_MS",
                self.tracking_retry_initial_delay_ms.to_string(),
            ),
            (
                "TRACKING_RETRY_MAX_DELAY_MS",
                self.tracking_retry_max_delay_ms.to_string(),
            ),
            ("TRACE_UI_URL", self.trace_ui_url.clone()),
            ("CONSOLE_SECURE_COOKIE", self.console_secure_cookie.to_string()),
            ("TOPIC_ORDER_EVENTS", self.topics.order_events.clone()),
            ("TOPIC_SAGA_EVENTS", self.topics.saga_events.clone()),
            ("TOPIC_TRACKING_EVENTS", self.topics.tracking_events.clone()),
            ("TOPIC_NOTIFICATIONS", self.topics.notifications.clone()),
            ("TOPIC_TRACKING_DLQ", self.topics.tracking_dlq.clone()),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|url| mask_url_password(&url))
                    .unwrap_or_else(|_| "(unset: no export)".into()),
            ),
            (
                "OTEL_SERVICE_NAME",
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "(unset: the program's name)".into()),
            ),
        ]
    }

    /// Prints the effective settings, secrets masked: one per line, or with `LOG_FORMAT=json` one
    /// log event whose `settings` object holds them (standard output then carries JSON only).
    /// `extra` adds settings of the command (the roles of `serve`).
    pub fn print(&self, title: &str, extra: &[(&'static str, String)]) {
        let mut settings = self.describe();
        settings.extend(extra.iter().cloned());
        match self.log_format {
            LogFormat::Json => {
                let map: serde_json::Map<String, serde_json::Value> = settings
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                    .collect();
                tracing::info!(settings = %serde_json::Value::Object(map), "{title}");
            }
            LogFormat::Pretty => {
                println!("{title}");
                for (k, v) in settings {
                    println!("  {k:<28} {v}");
                }
            }
        }
    }
}

/// Replaces the secrets of a connection URL with `*****`: the password of its user information
/// (`scheme://user:password@host`) and the value of every query parameter whose name holds
/// "password" (`?password=`, `?sslpassword=`).
pub fn mask_url_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((creds, host)) => match creds.split_once(':') {
                Some((user, _pw)) => format!("{scheme}://{user}:*****@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => format!("{name}=*****"),
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: ServiceConfig,
    }

    fn cfg(args: &[&str]) -> ServiceConfig {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::parse_from(v).c
    }

    #[test]
    fn production_refuses_missing_short_and_dev_keys() {
        assert!(matches!(
            cfg(&[]).validate(false),
            Err(ConfigError::MissingJwtSecret)
        ));
        assert!(matches!(
            cfg(&["--jwt-secret", "short"]).validate(false),
            Err(ConfigError::ShortJwtSecret(5))
        ));
        assert!(matches!(
            cfg(&["--jwt-secret", DEV_JWT_SECRET]).validate(false),
            Err(ConfigError::DevJwtSecret)
        ));
        assert!(cfg(&["--jwt-secret", &"k".repeat(32)]).validate(false).is_ok());
        assert!(cfg(&[]).validate(true).is_ok());
    }

    #[test]
    fn the_tracking_consumers_windows_are_settings_and_nonsense_is_refused() {
        let d = cfg(&[]);
        assert_eq!(d.tracking_unknown_order_window(), Duration::from_secs(300));
        assert_eq!(
            d.tracking_retry_delays(),
            (Duration::from_secs(1), Duration::from_secs(30))
        );
        let c = cfg(&[
            "--tracking-unknown-order-window-seconds",
            "0",
            "--tracking-retry-initial-delay-ms",
            "250",
            "--tracking-retry-max-delay-ms",
            "4000",
        ]);
        assert!(c.tracking_unknown_order_window().is_zero());
        assert_eq!(
            c.tracking_retry_delays(),
            (Duration::from_millis(250), Duration::from_secs(4))
        );
        assert!(format!("{:?}", c.describe()).contains("(\"TRACKING_UNKNOWN_ORDER_WINDOW_SECONDS\", \"0\")"));
        assert!(c.validate(true).is_ok());
        let backwards = cfg(&[
            "--tracking-retry-initial-delay-ms",
            "5000",
            "--tracking-retry-max-delay-ms",
            "10",
        ]);
        assert!(matches!(
            backwards.validate(true),
            Err(ConfigError::Invalid { .. })
        ));
        let zero = cfg(&["--tracking-retry-initial-delay-ms", "0"]);
        assert!(matches!(zero.validate(true), Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let c = cfg(&[
            "--jwt-secret",
            "supersecretsupersecretsupersecret!",
            "--database-url",
            "postgres://u:pw@h/db",
        ]);
        let text = format!("{:?}", c.describe());
        assert!(!text.contains("supersecret"));
        assert!(!text.contains(":pw@"));
        assert!(text.contains("postgres://u:*****@h/db"));
    }

    #[test]
    fn passwords_in_a_query_and_in_an_endpoint_are_masked() {
        assert_eq!(
            mask_url_password("postgres://u@h/db?sslmode=disable&password=hunter2&sslpassword=x"),
            "postgres://u@h/db?sslmode=disable&password=*****&sslpassword=*****"
        );
        assert_eq!(
            mask_url_password("postgres://u:p@ss@h/db?application_name=a@b"),
            "postgres://u:*****@h/db?application_name=a@b"
        );
        assert_eq!(
            mask_url_password("http://collector:4318"),
            "http://collector:4318"
        );
        assert_eq!(
            mask_url_password("http://otel:secret@collector:4318"),
            "http://otel:*****@collector:4318"
        );
    }
}
