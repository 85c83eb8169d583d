# syntax=docker/dockerfile:1.7
#
# ostore-orders: one image for every role of the service (`serve`, `migrate`, `users create`) and for
# the simulators (`sim catalog`, `sim shipments`), with its tools beside it (`ostore-tools`, from
# benches/tools). docker-compose.yml builds it once and runs it five
# ways. BuildKit is required (cache mounts); it is the default builder of current Docker releases.
#
#   docker build -t ostore-orders:0.1.0 .
#   docker run --rm ostore-orders:0.1.0 --help

############################ builder ############################
FROM rust:1.95-bookworm AS builder

# librdkafka is built from the sources bundled in rdkafka-sys (./configure + make, no cmake) with
# TLS and SASL/SCRAM from the system's OpenSSL and zlib, both through pkg-config; zstd is bundled.
# aws-lc-sys builds with the C compiler alone.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# sqlx's query macros read the committed `.sqlx/` data instead of a live database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# Only what the binary is compiled from: migrations/ (sqlx::migrate!) and sagas/ (include_str!) are
# embedded in the binary at build time.
COPY Cargo.toml Cargo.lock ./
COPY .sqlx ./.sqlx
COPY migrations ./migrations
COPY sagas ./sagas
COPY src ./src
COPY benches ./benches

# target/ lives in a cache mount, so the binary is copied out within the same step.
RUN --mount=type=cache,id=ostore-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=ostore-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=ostore-target,target=/src/target,sharing=locked \
    cargo build --release --locked --workspace --bin ostore-orders --bin ostore-tools \
 && install -D -m 0755 target/release/ostore-orders /out/ostore-orders \
 && install -D -m 0755 target/release/ostore-tools /out/ostore-tools

############################ runtime ############################
FROM debian:bookworm-20260824-slim AS runtime

LABEL org.opencontainers.image.title="ostore-orders" \
      org.opencontainers.image.description="OStore order management service: saga-orchestrated orders with a Postgres outbox feeding Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates: TLS to PostgreSQL / downstream services / Kafka / an OTLP endpoint over https.
# The binary links libc, libm, libgcc_s and libz (part of the slim base) and OpenSSL's libssl3
# (librdkafka's TLS).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ostore \
 && useradd --system --uid 10001 --gid ostore --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ostore

COPY --from=builder /out/ostore-orders /usr/local/bin/ostore-orders
# The tools (`kafka dump`, `verify`, the benchmarks), beside it: `ostore-orders kafka …` runs them.
COPY --from=builder /out/ostore-tools /usr/local/bin/ostore-tools

# Fails the build when a shared library the binary needs is missing from the runtime image.
RUN ["ostore-orders", "--version"]

USER 10001:10001

# Inside a container the compiled-in default (127.0.0.1:8080) is unreachable from outside; every
# subcommand that listens reads LISTEN_ADDR, and docker-compose.yml sets it per service.
ENV LISTEN_ADDR=0.0.0.0:8080

EXPOSE 8080

# The binary handles SIGTERM itself (graceful shutdown of every role).
ENTRYPOINT ["ostore-orders"]
CMD ["serve"]
