# K2 container image.
#   docker build -t k2 .
#   docker run --rm k2 --help
# The image has no config file. Mount one and run `run --config /etc/k2/k2.toml` (see
# docker-compose.yml), or override keys with K2_<SECTION>__<KEY> environment variables.

# Build stage. The rdkafka crate builds its bundled librdkafka with gcc and make and links zlib.
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /usr/src/k2
COPY . .
RUN cargo build --release --locked

# Runtime stage
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Run as an unprivileged user. /var/lib/k2/warehouse is the warehouse path of
# config/k2.production.toml. It is created here and owned by k2, so a named volume mounted there
# starts out writable.
RUN useradd --system --home-dir /var/lib/k2 --shell /usr/sbin/nologin k2 \
    && mkdir -p /var/lib/k2/warehouse \
    && chown -R k2:k2 /var/lib/k2
COPY --from=builder /usr/src/k2/target/release/k2 /usr/local/bin/k2
USER k2
# `k2 run` resolves relative catalog and warehouse paths against the working directory.
WORKDIR /var/lib/k2
EXPOSE 8080
ENTRYPOINT ["k2"]
CMD ["--help"]
