# Placeholder until the deployment issue: builds the binary and runs `generate` on the default
# model. The full image (non-root user, HEALTHCHECK, `serve`) comes with the HTTP server.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/nextoken /usr/local/bin/nextoken
COPY models/fetch-default.sh models/fetch-default.sh
RUN PIP_BREAK_SYSTEM_PACKAGES=1 ./models/fetch-default.sh
ENTRYPOINT ["nextoken"]
