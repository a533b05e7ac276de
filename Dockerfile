# fraudstream images: scorer and trainer, CPU or CUDA.
#   docker build --target scorer  -t fraudstream:cpu .
#   docker build --target trainer -t fraudstream-trainer:cpu .
#   docker build --target scorer  --build-arg VARIANT=cuda -t fraudstream:cuda .
# libtorch is PyTorch 2.13.0's from PyPI (what tch 0.26 expects): the slim CPU
# set, or the full CUDA set with VARIANT=cuda.
ARG VARIANT=cpu

FROM rust:1.95-bookworm AS build
ARG VARIANT
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV FRAUDSTREAM_CACHE=/opt/fraudstream
WORKDIR /src
COPY scripts/env.sh scripts/setup-libtorch scripts/
RUN scripts/setup-libtorch "--${VARIANT}"
COPY . .
# Build, then keep only the shared libraries the binaries load (their rpath
# points at /opt/fraudstream/libtorch-<variant>/lib).
RUN LIBTORCH="/opt/fraudstream/libtorch-${VARIANT}" cargo build --release --locked --workspace \
      --features "$(if [ "${VARIANT}" = cuda ]; then echo cuda; fi)" \
 && install -m 0755 target/release/fraudstream target/release/fraudstream-trainer /usr/local/bin/ \
 && site="$(ls -d /opt/fraudstream/libtorch-2.13.0-"${VARIANT}"/lib/python3*/site-packages)" \
 && mkdir -p /opt/runtime \
 && cp -a --parents "${site}/torch/lib" /opt/runtime/ \
 && if [ -d "${site}/nvidia" ]; then cp -a --parents "${site}/nvidia" /opt/runtime/; fi \
 && cp -a --parents "/opt/fraudstream/libtorch-${VARIANT}" /opt/runtime/

# Runs as user 10001 by default, and under any other UID too (OpenShift's
# restricted-v2 picks one from the namespace's range, always with GID 0): the
# user's primary group is 0 and every folder the binaries write is group-0
# owned and group-writable (g=u); nothing else is, except /tmp.
FROM debian:bookworm-slim AS runtime-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --gid 0 --home-dir /var/lib/fraudstream --no-create-home \
      --shell /usr/sbin/nologin fraudstream \
 && mkdir -p /var/lib/fraudstream /var/cache/fraudstream \
 && chown -R 10001:0 /var/lib/fraudstream /var/cache/fraudstream \
 && chmod -R g=u /var/lib/fraudstream /var/cache/fraudstream
COPY --from=build /opt/runtime/opt/ /opt/
COPY --from=build /usr/local/bin/fraudstream /usr/local/bin/fraudstream-trainer /usr/local/bin/
ENV HOME=/var/lib/fraudstream
USER 10001:0
WORKDIR /tmp

# The NVIDIA container runtime's variables only where CUDA libtorch is.
FROM runtime-base AS runtime-cpu
FROM runtime-base AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
# A stage of this file, not an image to pin (hadolint cannot resolve the ARG).
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime

FROM runtime AS scorer
# Downloaded model versions (k8s mounts an emptyDir at --model-cache instead).
ENV FRAUDSTREAM_MODEL_CACHE=/var/cache/fraudstream
EXPOSE 8501
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8501 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ok <&3"]
ENTRYPOINT ["fraudstream"]
CMD ["score", "--http-addr", "0.0.0.0:8501"]

FROM runtime AS trainer
# The binary and its libtorch load: the image is usable.
HEALTHCHECK --interval=60s --timeout=10s CMD ["fraudstream-trainer", "--version"]
ENTRYPOINT ["fraudstream-trainer"]
