# Builds sluice and the example echo application from this repository.
FROM rust:1.95-slim AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin sluice -p sluice \
 && cargo build --release --bin echo-server -p sluice-testkit

FROM debian:bookworm-slim
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY --from=build /src/target/release/echo-server /usr/local/bin/echo-server
EXPOSE 15051
ENTRYPOINT ["sluice"]
