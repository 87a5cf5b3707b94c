# One image with both binaries: the operator and the sidecar it injects.
# Build: docker build -t apipolicy:dev .   (or, with no Docker daemon: scripts/image.sh)

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY api/Cargo.toml api/Cargo.toml
COPY sidecar/Cargo.toml sidecar/Cargo.toml
COPY operator/Cargo.toml operator/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
# Declared bench targets must exist for cargo to read the manifest.
COPY sidecar/benches sidecar/benches
# Stand-in sources, so that this layer builds every dependency and fails loudly if it cannot.
RUN for c in api sidecar operator tests; do mkdir -p $c/src && echo 'fn main() {}' > $c/src/main.rs && touch $c/src/lib.rs; done \
 && cargo build --profile dist --locked -p apipolicy-sidecar -p apipolicy-operator
COPY . .
RUN touch api/src/lib.rs sidecar/src/*.rs operator/src/*.rs \
 && cargo build --profile dist --locked -p apipolicy-sidecar -p apipolicy-operator \
 && strip target/dist/apipolicy-sidecar target/dist/apipolicy-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/apipolicy-sidecar /usr/local/bin/apipolicy-sidecar
COPY --from=build /src/target/dist/apipolicy-operator /usr/local/bin/apipolicy-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/apipolicy-operator"]
CMD ["run"]
