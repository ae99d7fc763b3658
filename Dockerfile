# syntax=docker/dockerfile:1
# DataFlow: one binary for every role (`serve`, `worker`, `migrate`, operator commands).

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /build
# Dependencies first, against stub sources: this layer is rebuilt only when a manifest or
# Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY contracts/Cargo.toml contracts/
COPY platform/Cargo.toml platform/
COPY api/Cargo.toml api/
COPY worker/Cargo.toml worker/
RUN for crate in contracts platform api worker; do \
        mkdir -p "$crate/src" && touch "$crate/src/lib.rs"; \
    done \
    && mkdir -p src && touch src/lib.rs && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src contracts/src platform/src api/src worker/src
COPY . .
# COPY keeps the sources' own modification times, which can be older than the stub
# artifacts above; touching them makes cargo rebuild the workspace crates for real.
RUN find src contracts platform api worker -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && install -m 0755 target/release/dataflow /usr/local/bin/dataflow

FROM debian:bookworm-slim
# ca-certificates: rediss://, amqps://, smtps:// and webhook TLS verify against the system roots too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin dataflow \
    && install -d -o dataflow -g dataflow /data
COPY --from=builder /usr/local/bin/dataflow /usr/local/bin/dataflow
USER dataflow
WORKDIR /data
# The generated operator token, server secret, mail files and an embedded SQLite ledger
# live in the data folder.
ENV DATAFLOW_DATA_DIR=/data \
    DATAFLOW_LISTEN=0.0.0.0:8080
VOLUME ["/data"]
EXPOSE 8080
# Probes the configured listen address; worker-only containers override this with
# `dataflow healthcheck --ledger` (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["dataflow", "healthcheck"]
ENTRYPOINT ["dataflow"]
CMD ["all"]
