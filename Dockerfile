# syntax=docker/dockerfile:1
#
# redirect-agent, in a slim runtime image with the agent binary and bpftool:
#   docker build -t redirect-agent:0.1.0 .
# The e2e helper image (redirect-testclient, and redirect-testproxy as the stand-in sidecar and
# the destination servers), used by `cargo xtask e2e-kind`:
#   docker build --target e2e -t redirect-e2e:e2e .
# See docs/deploy.md. Build arguments:
#   DEBIAN_RELEASE  bookworm (default) or trixie
#   EBPF_TOOLCHAIN  debian (default): Debian's rustc-web + rust-web-src linked as a rustup
#                   toolchain, the route of the README; or nightly: rustup nightly + rust-src.

ARG DEBIAN_RELEASE=bookworm

# --- build: the userspace toolchain (rustup stable), the eBPF toolchain, bpf-linker for LLVM 22.
FROM debian:${DEBIAN_RELEASE} AS build
ARG EBPF_TOOLCHAIN=debian
ENV DEBIAN_FRONTEND=noninteractive
# rustc-web, rust-web-src and llvm-22-dev come from the release's security suite, which the
# Debian images list already.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential pkg-config \
      rustc-web cargo-web rust-web-src \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo
ENV PATH=/opt/cargo/bin:/usr/lib/llvm-22/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain stable \
 && if [ "$EBPF_TOOLCHAIN" = nightly ]; then \
      rustup toolchain install nightly --profile minimal --component rust-src; \
    else \
      rustup toolchain link debian /usr; \
    fi
RUN cargo install --locked bpf-linker --version '~0.13' --no-default-features --features llvm-22
WORKDIR /src
COPY . .
ENV REDIRECT_EBPF_TOOLCHAIN=${EBPF_TOOLCHAIN}
RUN --mount=type=cache,target=/opt/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p redirect-agent -p redirect-tests --bins \
 && mkdir -p /out \
 && cp target/release/redirect-agent target/release/redirect-testclient \
       target/release/redirect-testproxy /out/

# --- e2e: the client and the stand-in proxy/servers for the kind e2e (not for production).
FROM debian:${DEBIAN_RELEASE}-slim AS e2e
COPY --from=build /out/redirect-testclient /out/redirect-testproxy /usr/local/bin/
CMD ["sleep", "infinity"]

# --- agent (the default target): the single agent binary, plus bpftool to look at the pinned
# maps on a node (`bpftool map dump pinned /host/sys/fs/bpf/redirect/POLICY`).
FROM debian:${DEBIAN_RELEASE}-slim AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends bpftool \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/redirect-agent /usr/local/bin/redirect-agent
LABEL org.opencontainers.image.title="redirect-agent" \
      org.opencontainers.image.description="eBPF transparent redirection of pod traffic to the mesh proxy"
ENTRYPOINT ["/usr/local/bin/redirect-agent"]
CMD ["run"]
