//! Stand-in inference engines (`scripts/stacks/engine_standin.py`) started
//! under each engine's own command line, so that discovery meets them as
//! it meets the real ones: `python3 <dir>/vllm serve ...`, `python3 -m
//! sglang.launch_server ...`, `python3 <dir>/tritonserver ...`. The
//! launchers are small files in a directory of this process's, named as
//! the engines' programs and modules are.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use podgpu_agent::engines::catalog::EngineKind;

use crate::stacks::python_stacks_dir;

fn launcher_dir() -> PathBuf {
    std::env::temp_dir().join(format!("podgpu-engine-standins-{}", std::process::id()))
}

/// Writes a launcher at `relative` (under the launcher directory) that
/// runs the stand-in as `engine`.
fn launcher(relative: &str, engine: EngineKind) -> std::io::Result<PathBuf> {
    let path = launcher_dir().join(relative);
    std::fs::create_dir_all(path.parent().expect("launchers sit in a directory"))?;
    if let Some(package) = relative.strip_suffix(".py").and_then(|module| module.rsplit_once('/')) {
        std::fs::write(launcher_dir().join(package.0).join("__init__.py"), "")?;
    }
    std::fs::write(&path, format!("import engine_standin\nengine_standin.main({:?})\n", engine.name()))?;
    Ok(path)
}

/// `python3` with the launchers, the stand-in and the pinned stacks on
/// its path.
fn python() -> Command {
    let stacks = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stacks");
    let mut command = Command::new("python3");
    let python_path = format!("{}:{}:{}", launcher_dir().display(), stacks.display(), python_stacks_dir().display());
    command.env("PYTHONPATH", python_path).env("PYTHONUNBUFFERED", "1");
    command
}

/// The command that starts `engine`'s stand-in on 127.0.0.1, port chosen
/// by the kernel; it prints `{"listening": ADDR}` when ready.
pub fn command(engine: EngineKind) -> std::io::Result<Command> {
    let mut command = python();
    let program = |name: &str| launcher(name, engine).map(|path| path.display().to_string());
    match engine {
        EngineKind::Vllm => command.args([program("vllm")?.as_str(), "serve", "standin/model-0.5b", "--port", "0"]),
        EngineKind::Sglang => {
            launcher("sglang/launch_server.py", engine)?;
            command.args(["-m", "sglang.launch_server", "--model-path", "standin/model-0.5b", "--enable-metrics"])
        }
        EngineKind::Tgi => command.args([program("text-generation-router")?.as_str(), "--port", "0"]),
        EngineKind::Triton => command.args([program("tritonserver")?.as_str(), "--model-repository=/models"]),
        EngineKind::TrtllmServe => command.args([program("trtllm-serve")?.as_str(), "standin/model-0.5b"]),
        EngineKind::LlamaCpp => command.args([program("llama-server")?.as_str(), "-m", "standin.gguf", "--metrics"]),
        EngineKind::Lmdeploy => command.args([program("lmdeploy")?.as_str(), "serve", "api_server", "standin/model"]),
        EngineKind::Dynamo => {
            launcher("dynamo/frontend.py", engine)?;
            command.args(["-m", "dynamo.frontend", "--http-port", "0"])
        }
    };
    Ok(command)
}

/// The command that starts `engine`'s stand-in under a program name of no
/// engine (`python3 <dir>/<program>`): only its body can name the engine.
pub fn command_unnamed(engine: EngineKind, program: &str) -> std::io::Result<Command> {
    let mut command = python();
    command.arg(launcher(program, engine)?);
    Ok(command)
}

/// Sets a stand-in's gauges (`kv` as the engine's 0-1 fraction).
pub async fn set(addr: SocketAddr, waiting: u32, running: u32, kv: f64) -> std::io::Result<()> {
    control(addr, &format!("/standin/set?waiting={waiting}&running={running}&kv={kv}")).await
}

/// Records `count` first tokens of `ttft_s` seconds each.
pub async fn observe(addr: SocketAddr, ttft_s: f64, count: u32) -> std::io::Result<()> {
    control(addr, &format!("/standin/observe?ttft={ttft_s}&count={count}")).await
}

/// How the stand-in's metrics path answers from now on: `none`, `401`,
/// `garbage`, `huge` (50 MB) or `slow` (3 s).
pub async fn fault(addr: SocketAddr, mode: &str) -> std::io::Result<()> {
    control(addr, &format!("/standin/fault?mode={mode}")).await
}

async fn control(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let reply = crate::http::get(addr, path).await?;
    if reply.status != 200 {
        return Err(std::io::Error::other(format!("stand-in {addr}{path}: HTTP {}", reply.status)));
    }
    Ok(())
}
