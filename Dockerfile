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

FROM debian:bookworm-slim AS runtime
ARG VARIANT
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fraudstream
COPY --from=build /opt/runtime/opt/ /opt/
COPY --from=build /usr/local/bin/fraudstream /usr/local/bin/fraudstream-trainer /usr/local/bin/
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp

FROM runtime AS scorer
EXPOSE 8501
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8501 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ok <&3"]
ENTRYPOINT ["fraudstream"]
CMD ["score", "--http-addr", "0.0.0.0:8501"]

FROM runtime AS trainer
# The binary and its libtorch load: the image is usable.
HEALTHCHECK --interval=60s --timeout=10s CMD ["fraudstream-trainer", "--version"]
ENTRYPOINT ["fraudstream-trainer"]
