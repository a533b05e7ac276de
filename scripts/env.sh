# Shared settings for the project's scripts and Makefile (sourced, not run).
# Heavy installs live in a per-machine cache outside the checkout, so a fresh
# clone on the same machine reuses them.
FRAUDSTREAM_CACHE="${FRAUDSTREAM_CACHE:-$HOME/.cache/fraudstream}"
TORCH_VERSION=2.13.0
KAFKA_VERSION=4.1.1
GARAGE_VERSION=2.5.0
TOOLS_ROOT="$FRAUDSTREAM_CACHE/tools"
