# syntax=docker/dockerfile:1
# Multi-stage build of the seinode-tls binary; the runtime image holds only the binary and
# runs as an unprivileged user (UID 65532), with a read-only root filesystem in the chart.
# Built without the default `local` feature: no one-machine cluster, throwaway CA or stand-ins.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin seinode-tls \
    && install -D target/release/seinode-tls /out/seinode-tls

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/seinode-tls /usr/local/bin/seinode-tls
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/seinode-tls"]
CMD ["run", "--help"]
