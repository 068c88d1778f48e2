# Builds sluice and the example echo application from this repository.
FROM rust:1.95-slim AS build
WORKDIR /src
COPY . .
# --locked: the image builds exactly what Cargo.lock says.
RUN cargo build --locked --release --bin sluice -p sluice \
 && cargo build --locked --release --bin echo-server -p sluice-testkit

FROM debian:bookworm-slim
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY --from=build /src/target/release/echo-server /usr/local/bin/echo-server
# No root: sluice needs no privilege (its ports are above 1024) and writes
# no file. 65532 is the conventional "nonroot" uid of distroless images.
USER 65532:65532
EXPOSE 15051 15090
HEALTHCHECK --interval=5s --timeout=3s CMD ["sluice", "health"]
ENTRYPOINT ["sluice"]
