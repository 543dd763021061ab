# syntax=docker/dockerfile:1
#
# crm-server image: built with `docker compose up --build` (docker-compose.yml) or
#   docker build -t crm-server .
# Checked against docker-compose.yml and the crate by `cargo test --test api deploy`.

# ---- build ------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole workspace (.dockerignore keeps target/, data/, .env and secrets out): the crate,
# its `migrations` member, and build.rs, which compiles proto/ (pure Rust: no protoc needed).
COPY . .

# Cache mounts keep the registry and target/ between builds, so a source change rebuilds only
# what changed. The binary is copied out of the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin crm-server \
    && install -m 0755 target/release/crm-server /usr/local/bin/crm-server

# ---- run --------------------------------------------------------------------------------
# Same Debian release as the builder, so the binary finds the glibc it was linked against.
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to the providers and collectors; curl: the compose healthcheck.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 crm \
    && useradd --system --uid 10001 --gid crm --home-dir /app --shell /usr/sbin/nologin crm \
    && mkdir -p /app/data \
    && chown -R crm:crm /app

COPY --from=builder /usr/local/bin/crm-server /usr/local/bin/crm-server

WORKDIR /app
USER 10001:10001

# In a container: listen on every interface; the data folder (development SQLite file and
# secret) is writable by the crm user. Production settings come from the environment.
ENV LISTEN_ADDR=0.0.0.0:50051 \
    CRM_DATA_DIR=/app/data
EXPOSE 50051

ENTRYPOINT ["crm-server"]
CMD ["serve"]
