# The netpol-agent image: `cargo xtask image` builds it (docker or podman; docs/deploy-kind.md
# has the times and size). Where no container registry is reachable, deploy/local-base-images.sh
# creates the two base images locally first.
# No `# syntax=` line on purpose: the features used here (ARG before FROM, multi-stage) are in
# every builder's built-in Dockerfile frontend, and a `syntax` line makes BuildKit pull a
# frontend image from Docker Hub first, which breaks offline and air-gapped builds.
#
# Build stage: the toolchain the repository pins (README, "Development notes"; the same steps
# as `cargo xtask setup`): stable Rust for the agent, the nightly toolchain with rust-src for
# the eBPF crate (aya-build runs `cargo +nightly build -Z build-std=core` for it), LLVM 22 and
# bpf-linker built against LLVM 22 to link the BPF object.
ARG RUST_VERSION=1.95.0
FROM rust:${RUST_VERSION}-bookworm AS build
# The nightly the eBPF build is verified with (rustc 1.97.0-nightly e50aa6fba 2026-05-19),
# installed under the name aya-build runs.
ARG NIGHTLY=nightly-2026-05-20
ARG BPF_LINKER_VERSION=0.13.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
# aya-build runs `rustup run nightly ...`; rustup refuses `toolchain link` under an official
# channel name, so the dated toolchain's directory is renamed to the one `nightly` resolves to.
RUN rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && mv "${RUSTUP_HOME}/toolchains/${NIGHTLY}-${host}" "${RUSTUP_HOME}/toolchains/nightly-${host}" \
 && rustc +nightly --version
# Without the prefix llvm-sys finds /usr and fails with `unable to find library -lLLVM`.
RUN LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 PATH=/usr/lib/llvm-22/bin:$PATH \
    cargo install --locked bpf-linker --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p netpol-agent --bin netpol-agent \
 && install -m 0755 target/release/netpol-agent /netpol-agent

# Runtime: the agent (statically includes its eBPF object; TLS through rustls, no OpenSSL),
# bpftool for inspecting the pinned maps and programs (`kubectl exec ... -- bpftool map dump
# pinned /sys/fs/bpf/netpol/v1/np_ep`), and `mount` for the bpffs init container.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends bpftool mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /netpol-agent /usr/local/bin/netpol-agent
ENTRYPOINT ["/usr/local/bin/netpol-agent"]
CMD ["--help"]
