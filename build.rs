// Link-time set-up for every crate that builds a binary on top of `tch`.
//
// `tch`'s own link arguments only reach `tch`'s targets (tch-rs #907, #980),
// so a crate depending on it gets neither an rpath to libtorch nor
// libtorch_cuda. This script fixes both, so binaries and tests run without
// `LD_LIBRARY_PATH`. It is shared: `trainer/build.rs` includes this file.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    // Set by torch-sys (links = "tch"): the directory holding libtorch*.so.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=torch-sys did not report its libtorch directory; \
             binaries will need LD_LIBRARY_PATH (run `scripts/setup-libtorch` and build with `make`)"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let cuda_lib = Path::new(&lib_dir).join("libtorch_cuda.so");
        // The slim CPU install ships libtorch_cuda.so without its CUDA
        // libraries: linking it there makes the binary fail at start.
        let cudnn = Path::new(&lib_dir).join("../../nvidia/cudnn");
        if cuda_lib.exists() && cudnn.exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        } else {
            println!(
                "cargo:warning=feature `cuda` asked for, but {} has no full CUDA libtorch; \
                 run `scripts/setup-libtorch --cuda` and build with `make LIBTORCH_VARIANT=cuda`. \
                 Building CPU-only.",
                lib_dir
            );
        }
    }
}
