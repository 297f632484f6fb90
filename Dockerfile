# syntax=docker/dockerfile:1
# Luna Saver: one image with the three service binaries (luna-gateway, luna-saver, luna-status).
#   docker build -t luna-saver .
#   docker compose up -d            # see docker-compose.yml

FROM rust:1-bookworm AS builder
# cmake: aws-lc-sys (rustls' crypto provider, used by lapin) may build its C sources with it.
# nasm: rav1e's x86-64 assembly (the AVIF encoder).
# gcc and make come with the image; libdeflate and libwebp are compiled from bundled sources.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake nasm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target directory between builds; the binaries are
# copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p luna-gateway -p luna-saver -p luna-status \
    && mkdir -p /out \
    && cp target/release/luna-gateway target/release/luna-saver target/release/luna-status /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates: for amqps:// brokers. Nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin luna \
    && mkdir -p /data/output /data/blobs \
    && chown -R luna:luna /data
COPY --from=builder /out/luna-gateway /out/luna-saver /out/luna-status /usr/local/bin/
# Named volumes mounted here start out owned by `luna` (Docker copies the mount point's owner).
VOLUME ["/data/output", "/data/blobs"]
WORKDIR /data
ENV LUNA_OUTPUT_ROOT=/data/output \
    LUNA_LOG_FORMAT=json
USER luna:luna
# 19283 gateway, 19284 status, 19285 saver (/metrics, /healthz, /readyz).
EXPOSE 19283 19284 19285
# The binaries handle SIGTERM themselves (drain, then exit); pick one per container.
CMD ["luna-gateway", "--help"]
