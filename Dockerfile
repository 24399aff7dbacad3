# Build: the release binary carries its migrations and the Swagger UI (vendored).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked

# Run: a small image, an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 nestling
COPY --from=build /src/target/release/nestling /usr/local/bin/nestling
USER nestling
ENV APP_HOST=0.0.0.0 APP_PORT=8080 APP_ENV=production
EXPOSE 8080
# Liveness only: `nestling doctor` (the same image, `docker run --rm --env-file .env IMAGE nestling
# doctor`, or `docker compose run --rm doctor`) is the check to run before a deploy, not every 10 s.
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/health/live || exit 1
CMD ["nestling"]
