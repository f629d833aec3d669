//! Runs the `podgpu-agent` binary as a child process, waits for its ready
//! line, and stops it with SIGTERM (then SIGKILL) when dropped.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

/// A running agent and where it listens.
pub struct AgentProcess {
    child: Child,
    /// KEDA ExternalScaler gRPC address.
    pub keda: SocketAddr,
    /// HTTP address (/healthz, /pods, /metrics).
    pub http: SocketAddr,
}

impl AgentProcess {
    /// Starts `podgpu-agent standalone` with `args` on loopback ports chosen
    /// by the kernel, and returns once both servers accept connections.
    pub fn start(binary: &PathBuf, args: &[String]) -> anyhow::Result<Self> {
        Self::start_role(binary, "standalone", args)
    }

    /// Starts `podgpu-agent ROLE` (standalone, node, scaler) with `args`.
    pub fn start_role(binary: &PathBuf, role: &str, args: &[String]) -> anyhow::Result<Self> {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
        Self::spawn(binary, role, args, &rust_log, Stdio::inherit())
    }

    /// As `start_role`, logging at `rust_log` into the file `log` (for
    /// tests that read what the agent logged).
    pub fn start_role_logged(
        binary: &PathBuf,
        role: &str,
        args: &[String],
        rust_log: &str,
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Self::spawn(binary, role, args, rust_log, Stdio::from(file))
    }

    /// As `start_role`, in a process whose capability bounding set lacks
    /// `capability` (a `CAP_*` number): root execs the agent with every
    /// capability of the bounding set, so the agent runs without it, as a
    /// container without it would.
    pub fn start_role_without_capability(
        binary: &PathBuf,
        role: &str,
        args: &[String],
        capability: u32,
    ) -> anyhow::Result<Self> {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
        Self::spawn_with(binary, role, args, &rust_log, Stdio::inherit(), move |command| {
            use std::os::unix::process::CommandExt;
            // What is tested is how the agent degrades: CI's "every probe
            // must load" would make the missing capability fatal instead.
            command.env_remove("PODGPU_REQUIRE_EBPF");
            // SAFETY: prctl only, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(capability), 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    fn spawn(binary: &PathBuf, role: &str, args: &[String], rust_log: &str, stderr: Stdio) -> anyhow::Result<Self> {
        Self::spawn_with(binary, role, args, rust_log, stderr, |_| {})
    }

    fn spawn_with(
        binary: &PathBuf,
        role: &str,
        args: &[String],
        rust_log: &str,
        stderr: Stdio,
        prepare: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        crate::detach_from_terminal(&mut command);
        prepare(&mut command);
        let mut child = command
            .arg(role)
            // Kernel-chosen loopback ports unless the caller pins them.
            .args(if args.iter().any(|a| a == "--keda-listen") {
                &[][..]
            } else {
                &["--keda-listen", "127.0.0.1:0"][..]
            })
            .args(if args.iter().any(|a| a == "--http-listen") {
                &[][..]
            } else {
                &["--http-listen", "127.0.0.1:0"][..]
            })
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} (build it first: cargo build -p podgpu-agent)", binary.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("agent stdout not captured"))?;
        let (lines, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let line = match ready.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                bail!("agent did not report ready within 30 s (exit status: {status:?}); see its log above");
            }
        };
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("agent ready line {line:?}"))?;
        let address = |key: &str| -> anyhow::Result<SocketAddr> {
            ready[key]
                .as_str()
                .ok_or_else(|| anyhow!("no {key} in {line}"))?
                .parse()
                .with_context(|| format!("{key} in {line}"))
        };
        Ok(Self { keda: address("keda")?, http: address("http")?, child })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit; returns
    /// whether it exited cleanly (status 0) in time.
    pub fn stop(&mut self, grace: Duration) -> bool {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// One pod of a static metadata file: uid, namespace, name, `app` label.
pub struct PodEntry<'a> {
    /// Pod UID.
    pub uid: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub name: &'a str,
    /// Value of its `app` label.
    pub app: &'a str,
}

impl AgentProcess {
    /// Starts `podgpu-agent standalone` without a GPU, ticking every
    /// 100 ms, with a static metadata file naming `pods` and `extra`
    /// arguments; the file's directory lives as long as the returned guard.
    pub fn start_for_pods(pods: &[PodEntry<'_>], extra: &[&str]) -> anyhow::Result<(Self, tempfile::TempDir)> {
        Self::start_for_pods_logged(pods, extra, None)
    }

    /// As `start_for_pods`; with `logging` (a `RUST_LOG` value), the
    /// agent's log goes to `agent.log` in the returned directory.
    pub fn start_for_pods_logged(
        pods: &[PodEntry<'_>],
        extra: &[&str],
        logging: Option<&str>,
    ) -> anyhow::Result<(Self, tempfile::TempDir)> {
        let files = tempfile::tempdir()?;
        let metadata = files.path().join("pods.yaml");
        let mut text = String::from("pods:\n");
        for pod in pods {
            text.push_str(&format!(
                "  - {{uid: {}, namespace: {}, name: {}, labels: {{app: {}}}}}\n",
                pod.uid, pod.namespace, pod.name, pod.app
            ));
        }
        std::fs::write(&metadata, text)?;
        let metadata = metadata.display().to_string();
        let mut args: Vec<String> = ["--tick-ms", "100", "--pod-metadata", &metadata].map(String::from).to_vec();
        // No GPU unless the caller names one.
        if !extra.iter().any(|arg| arg.starts_with("--gpu")) {
            args.extend(["--gpu".to_string(), "none".to_string()]);
        }
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let binary = crate::workspace_binary("podgpu-agent");
        let agent = match logging {
            Some(rust_log) => {
                Self::start_role_logged(&binary, "standalone", &args, rust_log, &files.path().join("agent.log"))?
            }
            None => Self::start(&binary, &args)?,
        };
        Ok((agent, files))
    }
}
