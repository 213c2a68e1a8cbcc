# syntax=docker/dockerfile:1

# ---- build ----------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The caches keep the registry and the build directory between image builds; the binary is
# copied out of the cached target directory because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin hot-potato \
    && cp target/release/hot-potato /usr/local/bin/hot-potato

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: HTTPS targets (the HTTP client verifies against the system store).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system hotpotato \
    && useradd --system --gid hotpotato --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin hotpotato \
    && mkdir -p /data \
    && chown hotpotato:hotpotato /data
COPY --from=builder /usr/local/bin/hot-potato /usr/local/bin/hot-potato
USER hotpotato
WORKDIR /data
# Listen on every interface inside the container; keep the enrollment store in /data
# (mount a volume there so enrollments survive the container).
ENV HTTP_HOST=0.0.0.0 SQLITE_BACKUP_PATH=/data/hotpotato.sqlite
EXPOSE 8080
# `docker run IMAGE` serves; `docker run IMAGE demo-receiver --host 0.0.0.0` runs the demo receiver.
ENTRYPOINT ["/usr/local/bin/hot-potato"]
