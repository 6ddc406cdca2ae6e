# wxgate container image: built with the Rust image, run on distroless as a non-root user.
#
#   docker build -t wxgate .
#   docker run -p 8080:8080 \
#     -v "$PWD/config.toml:/etc/wxgate/config.toml:ro" -v wxgate-data:/var/lib/wxgate \
#     -e WXGATE_SHOP_SECRET -e WXGATE_SIGNING_KEY wxgate
#
# The config is mounted, never baked in; secrets come from the environment (${VAR} in the config).
# The SQLite identity store lives in the /var/lib/wxgate volume: set identity.store =
# "sqlite:///var/lib/wxgate/wxgate.db". The health check asks the admin listener's /readyz, so keep
# server.admin_listen on 127.0.0.1 inside the container unless Prometheus scrapes it from outside.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to wxgate's own code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs benches/request_path.rs tests/it/main.rs \
 && cargo build --release --locked --bin wxgate \
 && rm -rf src benches tests
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin wxgate \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wxgate /usr/local/bin/wxgate
COPY --from=build --chown=nonroot:nonroot /out/data /var/lib/wxgate
WORKDIR /var/lib/wxgate
VOLUME ["/var/lib/wxgate"]
ENV WXGATE_CONFIG=/etc/wxgate/config.toml
EXPOSE 8080
USER nonroot
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/wxgate", "healthcheck"]
# SIGTERM drains in-flight requests for server.shutdown_timeout; give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wxgate"]
