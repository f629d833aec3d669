//! Containers as Kubernetes runs them, with `runc`: a bundle per container
//! (OCI `config.json` plus a root filesystem of host bind mounts), its own
//! mount, UTS, IPC and cgroup namespaces, a kubelet-shaped cgroup path,
//! and exactly the capabilities asked for.
//!
//! The node agent's settings are read from the chart's DaemonSet template
//! (`ChartAgent::read`), so a test runs the agent with the capabilities,
//! mounts and host namespaces the chart gives it, and the two cannot drift.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// One hostPath volume of the DaemonSet, as mounted into the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChartMount {
    /// Volume name.
    pub name: String,
    /// Path inside the container.
    pub mount_path: String,
    /// Host path (templated paths resolved from `values.yaml`).
    pub host_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What the chart's DaemonSet gives the agent container.
#[derive(Clone, Debug)]
pub struct ChartAgent {
    /// Capabilities added after dropping ALL (`BPF`, `PERFMON`, ...).
    pub capabilities: Vec<String>,
    /// Whether every capability is dropped first.
    pub drops_all: bool,
    /// `hostPID: true`.
    pub host_pid: bool,
    /// `hostNetwork: true`.
    pub host_network: bool,
    /// `privileged: true`.
    pub privileged: bool,
    /// hostPath volumes with their mounts.
    pub mounts: Vec<ChartMount>,
    /// The seccomp profile the chart's default gives the agent (its
    /// `files/seccomp-agent.json`, installed as a Localhost profile), or
    /// `None` when the default is the runtime's or none.
    pub seccomp: Option<serde_json::Value>,
    /// The container's environment with literal values, `NAME=value`
    /// (`LD_LIBRARY_PATH=/host-nvidia`: where the agent finds the host's
    /// NVIDIA libraries).
    pub env: Vec<String>,
}

/// `- name: X` followed by `value: Y` in the agent container's `env:`
/// list, as `X=Y` (entries with `valueFrom` or a templated value are
/// left out).
fn literal_env(template: &str) -> Vec<String> {
    let Some((_, list)) = template.split_once("          env:\n") else { return Vec::new() };
    let lines: Vec<&str> = list.lines().take_while(|line| line.starts_with("            ")).map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|pair| {
            let name = pair[0].strip_prefix("- name:")?.trim();
            let value = pair[1].strip_prefix("value:")?.trim();
            (!value.contains("{{")).then(|| format!("{name}={}", value.trim_matches('"')))
        })
        .collect()
}

/// `text` with each `{{ if .Values.KEY }}...{{ end }}` replaced by what
/// it holds where `values.yaml` sets KEY to true, else by nothing.
fn resolve_conditionals(text: &str, values: &str) -> String {
    let mut resolved = String::new();
    let mut rest = text;
    while let Some((before, after)) = rest.split_once("{{ if .Values.") {
        resolved.push_str(before);
        let Some((key, after)) = after.split_once(" }}") else { break };
        let Some((inner, after)) = after.split_once("{{ end }}") else { break };
        if chart_value(values, key).as_deref() == Some("true") {
            resolved.push_str(inner);
        }
        rest = after;
    }
    resolved.push_str(rest);
    resolved
}

/// The value after `key:` on a line, without quotes.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split_once(&format!("{key}:"))?.1;
    let value = rest.split([',', '}']).next()?.trim();
    Some(value.trim_matches('"'))
}

/// `values.yaml` top-level `key: value` (for templated host paths).
fn chart_value(values: &str, key: &str) -> Option<String> {
    values
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")).map(|v| v.trim().trim_matches('"').to_string()))
}

impl ChartAgent {
    /// Reads the agent container's security settings from
    /// `chart/templates/daemonset.yaml` (and `values.yaml` for templated
    /// host paths).
    pub fn read(chart: &Path) -> anyhow::Result<Self> {
        let whole = fs::read_to_string(chart.join("templates/daemonset.yaml")).context("reading the DaemonSet")?;
        // The agent container and the pod around it; not the init container.
        let (pod, agent) = whole.split_once("        - name: agent\n").ok_or_else(|| anyhow!("no agent container"))?;
        let pod = pod.split("      initContainers:").next().unwrap_or(pod);
        let template = format!("{pod}{agent}");
        let values = fs::read_to_string(chart.join("values.yaml")).context("reading values.yaml")?;
        let list = |key: &str| -> Vec<String> {
            template
                .lines()
                .find_map(|line| line.trim().strip_prefix(&format!("{key}: [")))
                .map(|rest| {
                    resolve_conditionals(rest, &values)
                        .trim_end_matches(']')
                        .split(',')
                        .map(|c| c.trim().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        let flag = |key: &str| template.lines().any(|line| line.trim() == format!("{key}: true"));
        let resolve = |path: &str| -> anyhow::Result<String> {
            match path.strip_prefix("{{ .Values.").and_then(|p| p.strip_suffix(" }}")) {
                Some(key) => chart_value(&values, key).ok_or_else(|| anyhow!("values.yaml has no {key}")),
                None => Ok(path.to_string()),
            }
        };
        let mut host_paths = Vec::new();
        for line in template.lines().filter(|line| line.contains("hostPath:")) {
            let name = value_of(line, "name").ok_or_else(|| anyhow!("volume without a name: {line}"))?;
            let path = line.split_once("path:").map(|(_, p)| p.trim().trim_end_matches(['}', ' ']).trim()).unwrap();
            let path = path.split(", type:").next().unwrap_or(path).trim();
            host_paths.push((name.to_string(), path.to_string()));
        }
        let mut mounts = Vec::new();
        for line in template.lines().filter(|line| line.contains("mountPath:")) {
            let name = value_of(line, "name").ok_or_else(|| anyhow!("mount without a name: {line}"))?;
            let Some((_, host_path)) = host_paths.iter().find(|(volume, _)| volume == name) else { continue };
            mounts.push(ChartMount {
                name: name.to_string(),
                mount_path: value_of(line, "mountPath").unwrap_or_default().to_string(),
                // Resolved only for the agent's own mounts.
                host_path: resolve(host_path)?,
                read_only: value_of(line, "readOnly") == Some("true"),
            });
        }
        if mounts.is_empty() {
            bail!("no hostPath mounts found in the DaemonSet");
        }
        let default_profile = values
            .split_once("\nseccomp:\n")
            .and_then(|(_, block)| block.lines().find_map(|l| l.trim().strip_prefix("profile:")))
            .map(str::trim);
        let seccomp = if default_profile == Some("podgpu") && template.contains("localhostProfile: podgpu/agent.json") {
            let path = chart.join("files/seccomp-agent.json");
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)
        } else {
            None
        };
        Ok(Self {
            capabilities: list("add"),
            drops_all: list("drop") == ["ALL"],
            host_pid: flag("hostPID"),
            host_network: flag("hostNetwork"),
            privileged: flag("privileged"),
            mounts,
            seccomp,
            env: literal_env(&template),
        })
    }
}

/// A bind mount into a container.
#[derive(Clone, Debug)]
pub struct Bind {
    /// Host path.
    pub source: PathBuf,
    /// Path inside the container.
    pub destination: String,
    /// Read-only.
    pub read_only: bool,
}

/// How to run one container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// argv; `args[0]` is a path inside the container.
    pub args: Vec<String>,
    /// Environment (`KEY=value`).
    pub env: Vec<String>,
    /// cgroup path relative to the hierarchy roots, kubelet-shaped.
    pub cgroup_path: String,
    /// Share the host's PID namespace.
    pub host_pid: bool,
    /// Capabilities (`CAP_BPF`, ...); empty: none at all.
    pub capabilities: Vec<String>,
    /// Extra bind mounts.
    pub binds: Vec<Bind>,
    /// An image's unpacked root filesystem; `None`: an empty root with the
    /// host's /usr bound read-only.
    pub rootfs: Option<PathBuf>,
    /// A seccomp profile (OCI / Kubernetes Localhost JSON); `None`: none.
    pub seccomp: Option<serde_json::Value>,
}

/// A running runc container; deleted (killed) on drop.
pub struct Container {
    /// Container id.
    pub id: String,
    /// Host pid of its first process.
    pub pid: u32,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    cgroup_path: String,
    bundle: tempfile::TempDir,
}

fn runc(args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new("runc").args(args).stdin(Stdio::null()).output().context("running runc (apt install runc)")?;
    if !out.status.success() {
        bail!("runc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Container {
    /// Creates the bundle and starts the container detached.
    pub fn run(id: &str, spec: &ContainerSpec) -> anyhow::Result<Self> {
        let bundle = tempfile::Builder::new().prefix("podgpu-runc-").tempdir()?;
        let rootfs = match &spec.rootfs {
            Some(image) => image.clone(),
            None => {
                let rootfs = bundle.path().join("rootfs");
                for dir in ["usr", "proc", "sys", "dev", "etc", "tmp"] {
                    fs::create_dir_all(rootfs.join(dir))?;
                }
                // Debian's merged /usr: the rest are symlinks into it.
                for (link, target) in
                    [("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin"), ("sbin", "usr/sbin")]
                {
                    std::os::unix::fs::symlink(target, rootfs.join(link))?;
                }
                rootfs
            }
        };
        let mut mounts = vec![
            serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
            serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
        ];
        if spec.rootfs.is_none() {
            mounts.push(serde_json::json!({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}));
        }
        for bind in &spec.binds {
            let mut options = vec!["rbind"];
            if bind.read_only {
                options.push("ro");
            }
            mounts.push(serde_json::json!({
                "destination": bind.destination,
                "type": "bind",
                "source": bind.source,
                "options": options,
            }));
        }
        let mut namespaces = vec![
            serde_json::json!({"type": "mount"}),
            serde_json::json!({"type": "uts"}),
            serde_json::json!({"type": "ipc"}),
            serde_json::json!({"type": "cgroup"}),
        ];
        if !spec.host_pid {
            namespaces.push(serde_json::json!({"type": "pid"}));
        }
        let caps = &spec.capabilities;
        let mut config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": spec.args,
                "env": spec.env,
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": true
            },
            "root": {"path": rootfs, "readonly": true},
            "hostname": id,
            "mounts": mounts,
            "linux": {
                "cgroupsPath": spec.cgroup_path,
                "namespaces": namespaces,
                // As containerd's defaults for an unprivileged container.
                "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
            }
        });
        if let Some(profile) = &spec.seccomp {
            config["linux"]["seccomp"] = profile.clone();
        }
        fs::write(bundle.path().join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let log = bundle.path().join("output.log");
        let output = fs::File::create(&log)?;
        let _ = runc(&["delete", "--force", id]);
        let status = Command::new("runc")
            .args(["run", "--detach", "--bundle"])
            .arg(bundle.path())
            .arg(id)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .status()
            .context("running runc (apt install runc)")?;
        if !status.success() {
            bail!("runc run {id} failed: {}", fs::read_to_string(&log).unwrap_or_default());
        }
        let state: serde_json::Value = serde_json::from_str(&runc(&["state", id])?)?;
        let pid = state["pid"].as_u64().ok_or_else(|| anyhow!("runc state has no pid: {state}"))? as u32;
        Ok(Self { id: id.to_string(), pid, log, cgroup_path: spec.cgroup_path.clone(), bundle })
    }

    /// Waits until a line of the container's output satisfies `ready`.
    pub fn wait_for_line(&self, within: Duration, ready: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|line| ready(line)) {
                return Ok(line.to_string());
            }
            if !self.is_running() {
                bail!("container {} stopped before it was ready; its output:\n{text}", self.id);
            }
            if Instant::now() > deadline {
                bail!("container {} did not get ready within {within:?}; its output:\n{text}", self.id);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether runc says the container is running.
    pub fn is_running(&self) -> bool {
        runc(&["state", &self.id])
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|state| state["status"] == "running")
    }

    /// Everything the container wrote so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs every process of the container (an OOM kill) and waits
    /// until runc says it stopped.
    pub fn kill(&self) -> anyhow::Result<()> {
        runc(&["kill", "--all", &self.id, "KILL"])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let state: serde_json::Value = serde_json::from_str(&runc(&["state", &self.id])?)?;
            if state["status"] == "stopped" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("container {} still running after SIGKILL", self.id)
    }

    /// The bundle directory (for files the container reads).
    pub fn bundle(&self) -> &Path {
        self.bundle.path()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = runc(&["delete", "--force", &self.id]);
        // runc removes the container's cgroup; the pod levels are ours.
        remove_cgroup_dirs(&self.cgroup_path);
    }
}

/// Kubelet's cgroup layout for a pod's container, per driver and QoS class.
#[derive(Clone, Copy, Debug)]
pub enum CgroupLayout {
    /// systemd driver, containerd: `kubepods.slice/kubepods-<qos>.slice/...scope`.
    Systemd,
    /// cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>`.
    Cgroupfs,
}

/// QoS classes as kubelet names their cgroups.
#[derive(Clone, Copy, Debug)]
pub enum Qos {
    /// Directly under kubepods.
    Guaranteed,
    /// Under burstable.
    Burstable,
    /// Under besteffort.
    BestEffort,
}

/// The cgroup path kubelet (and the runtime) would give container `id` of
/// pod `uid`.
pub fn kubelet_cgroup_path(layout: CgroupLayout, qos: Qos, uid: &str, id: &str) -> String {
    let qos_name = match qos {
        Qos::Guaranteed => None,
        Qos::Burstable => Some("burstable"),
        Qos::BestEffort => Some("besteffort"),
    };
    match layout {
        CgroupLayout::Systemd => {
            let uid = uid.replace('-', "_");
            match qos_name {
                None => format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{id}.scope"),
                Some(q) => {
                    format!("/kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice/cri-containerd-{id}.scope")
                }
            }
        }
        CgroupLayout::Cgroupfs => match qos_name {
            None => format!("/kubepods/pod{uid}/{id}"),
            Some(q) => format!("/kubepods/{q}/pod{uid}/{id}"),
        },
    }
}

/// Removes the empty cgroup directories of `path` (and its parents up to
/// the kubepods level) from every hierarchy under `/sys/fs/cgroup`.
pub fn remove_cgroup_dirs(path: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|entry| entry.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        let mut dir = root.join(path.trim_start_matches('/'));
        while dir.starts_with(&root) && dir != root {
            if crate::pod::remove_cgroup_dir(&dir).is_err() || !dir.pop() {
                break;
            }
        }
    }
}

/// The agent's container image (`scripts/build-image.sh`), unpacked with
/// umoci (which checks every digest) into a runtime bundle under `into`;
/// returns its root filesystem.
pub fn unpack_image(archive: &Path, into: &Path) -> anyhow::Result<PathBuf> {
    if !archive.exists() {
        bail!("{} is missing: scripts/test.sh builds it (scripts/build-image.sh)", archive.display());
    }
    let layout = into.join("layout");
    fs::create_dir_all(&layout)?;
    let status = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&layout).status().context("tar")?;
    if !status.success() {
        bail!("unpacking {}", archive.display());
    }
    let index: serde_json::Value = serde_json::from_str(&fs::read_to_string(layout.join("index.json"))?)?;
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .ok_or_else(|| anyhow!("the image index names no tag"))?;
    let bundle = into.join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle)
        .output()
        .context("running umoci (apt install umoci)")?;
    if !out.status.success() {
        bail!("umoci unpack: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(bundle.join("rootfs"))
}
