//! The asynchronous half of the service against real PostgreSQL (a fresh database per test): the
//! outbox relay publishing to Kafka, and the tracking consumer applying TrackingEvents.
//!
//! Most tests use librdkafka's mock cluster in process (the broker `dev` embeds). The ones that
//! replay the relay after a crash, take the broker down, or kill a consumer group member run
//! against **Apache Kafka** as well (`..._on_apache_kafka`): the shared broker `scripts/test` starts
//! (`TEST_KAFKA_BOOTSTRAP_SERVERS`, with topics of the test's own), or, for an outage, a private
//! broker the test starts and crashes itself (`TEST_KAFKA_BROKER_SCRIPT`), so the shared one never
//! stops under the other tests.
//!
//! `fixture` holds the setup the tests share; the tests are grouped by subject.

#[path = "../support/mod.rs"]
mod support;

mod fixture;

mod apply;
mod consumer;
mod ordering;
mod outages;
mod real_broker;
mod relay;
