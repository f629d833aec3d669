//! A stand-in for libcuda, for tests without a GPU: `integration/cuda/`
//! holds a `libcuda.so.1` exporting the launch entry points and the
//! applications that load it with `dlopen` and launch through it, as the
//! CUDA runtime does (`launcher`: a fixed number of launches of each
//! kind; `launch_loop`: a steady loop at a chosen rate; `waiter`: launches
//! and waits in cycles, for the completion spans; `runtime_app`: kernels
//! launched through a CUDA-runtime stand-in, `libcudart.so.12`, whose one
//! call reaches libcuda for every kernel).
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

/// Builds `libcuda.so.1`, `libcudart.so.12`, `launcher`, `launch_loop`,
/// `waiter` and `runtime_app` into `dir`.
pub fn build(dir: &Path) -> anyhow::Result<()> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let gcc = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("gcc").args(args).current_dir(&sources).status().context("gcc")?;
        if !status.success() {
            bail!("gcc {args:?} failed");
        }
        Ok(())
    };
    let out = |name: &str| dir.join(name).display().to_string();
    gcc(&["-shared", "-fPIC", "-O2", "-o", &out("libcuda.so.1"), "libcuda.c"])?;
    gcc(&["-O2", "-o", &out("launcher"), "launcher.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("launch_loop"), "launch_loop.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("waiter"), "waiter.c", "-ldl", "-lpthread"])?;
    gcc(&["-shared", "-fPIC", "-O2", "-o", &out("libcudart.so.12"), "cudart.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("runtime_app"), "runtime_app.c", "-ldl"])
}
