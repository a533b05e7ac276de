//! Same link set-up as the `fraudstream` binary: rpath to libtorch, optional CUDA.
include!("../build.rs");
