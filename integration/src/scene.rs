//! A whole node in miniature: tenant HTTP servers in their own cgroup
//! "pods", a pod metadata file naming them, optionally a simulated GPU
//! scenario giving each tenant a known GPU load, and the agent watching it
//! all. Dropping the scene stops the agent, the tenants, and removes the
//! cgroups and files.
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Context as _};

use crate::agent::AgentProcess;
use crate::pod::{new_uid, CgroupPod};
use crate::stacks::Stack;
use crate::workspace_binary;

/// One tenant pod to create.
#[derive(Clone, Debug)]
pub struct TenantSpec {
    /// Pod UID; a fresh one when `None`.
    pub uid: Option<String>,
    /// Pod name.
    pub name: String,
    /// Value of the pod's `app` label.
    pub app: String,
    /// Response body size of its HTTP server.
    pub body_bytes: usize,
    /// Simulated GPU schedule `(seconds, percent)`; used with `GpuSetup::SimPerTenant`.
    pub gpu_steps: Vec<(f64, f64)>,
    /// Simulated framebuffer bytes.
    pub gpu_memory_bytes: u64,
    /// The server it runs.
    pub server: Stack,
    /// Serve HTTP on a second port too (`tenant` only).
    pub second_port: bool,
    /// Environment of its server process.
    pub env: Vec<(String, String)>,
}

impl TenantSpec {
    /// A tenant with a fresh UID, 256-byte responses and no GPU load.
    pub fn new(name: &str, app: &str) -> Self {
        Self {
            uid: None,
            name: name.to_string(),
            app: app.to_string(),
            body_bytes: 256,
            gpu_steps: Vec::new(),
            gpu_memory_bytes: 0,
            server: Stack::Tenant,
            second_port: false,
            env: Vec::new(),
        }
    }
}

/// Which GPU backend the agent gets.
#[derive(Clone, Debug)]
pub enum GpuSetup {
    /// A scenario generated from the tenants' `gpu_steps`.
    SimPerTenant,
    /// A scenario written by the caller (YAML), for faults, MIG and MPS.
    Scenario(String),
    /// A literal `--gpu` value (`sim`, `nvml`, `none`, ...).
    Arg(String),
}

/// A running tenant.
pub struct Tenant {
    /// Its pod.
    pub pod: CgroupPod,
    /// Where its server listens.
    pub addr: SocketAddr,
    /// Its second port, when asked for.
    pub second_addr: Option<SocketAddr>,
    /// Its spec.
    pub spec: TenantSpec,
}

impl Tenant {
    /// Starts `spec`'s server in a new cgroup pod under `cgroup_root` and
    /// waits until it listens.
    pub fn start(cgroup_root: &std::path::Path, spec: &TenantSpec) -> anyhow::Result<Self> {
        let uid = spec.uid.clone().unwrap_or_else(new_uid);
        let mut pod = CgroupPod::create(cgroup_root, &uid)
            .with_context(|| format!("creating cgroup pod under {} (are you root?)", cgroup_root.display()))?;
        let mut command = spec.server.command(spec.body_bytes, spec.second_port);
        command.envs(spec.env.iter().map(|(key, value)| (key, value)));
        let child = pod.spawn(command).context("starting the tenant server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("tenant stdout not captured"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("tenant said {line:?}"))?;
        let addr = ready["listening"].as_str().ok_or_else(|| anyhow!("tenant said {line:?}"))?.parse()?;
        let second_addr = ready["second"].as_str().map(str::parse).transpose()?;
        Ok(Tenant { pod, addr, second_addr, spec: TenantSpec { uid: Some(uid), ..spec.clone() } })
    }
}

/// Tenants plus the agent watching them.
pub struct Scene {
    /// The agent (dropped first: fields drop in declaration order).
    pub agent: AgentProcess,
    /// The tenants.
    pub tenants: Vec<Tenant>,
    /// The namespace all tenants are in.
    pub namespace: String,
    /// cgroup v2 root used.
    pub cgroup_root: PathBuf,
    /// The agent's arguments, for restarts.
    agent_args: Vec<String>,
    /// A nested root this scene created (a simulated node), removed on drop.
    node_root: Option<PathBuf>,
    _files: tempfile::TempDir,
}

impl Scene {
    /// Creates the tenants, writes metadata (and scenario), starts the agent.
    pub fn start(namespace: &str, specs: &[TenantSpec], gpu: GpuSetup, extra_args: &[String]) -> anyhow::Result<Self> {
        Self::start_on(None, namespace, specs, gpu, extra_args)
    }

    /// Like `start`, on a simulated node: the pods live under a nested
    /// cgroup root `<v2 root>/<node>` and the agent watches only that root,
    /// as each node's agent sees only its own pods.
    pub fn start_on(
        node: Option<&str>,
        namespace: &str,
        specs: &[TenantSpec],
        gpu: GpuSetup,
        extra_args: &[String],
    ) -> anyhow::Result<Self> {
        let host_root = podgpu_agent::pods::cgroup_tree::host_v2_root().context("finding the cgroup v2 mount")?;
        let node_root = node.map(|name| host_root.join(name));
        if let Some(root) = &node_root {
            std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        }
        let cgroup_root = node_root.clone().unwrap_or(host_root);
        let files = tempfile::Builder::new().prefix("podgpu-scene-").tempdir()?;
        let tenants = specs.iter().map(|spec| Tenant::start(&cgroup_root, spec)).collect::<anyhow::Result<Vec<_>>>()?;

        let mut metadata = String::from("pods:\n");
        for tenant in &tenants {
            let _ = writeln!(
                metadata,
                "  - {{uid: {}, namespace: {namespace}, name: {}, labels: {{app: {}}}}}",
                tenant.pod.uid, tenant.spec.name, tenant.spec.app
            );
        }
        let metadata_path = files.path().join("pods.yaml");
        std::fs::write(&metadata_path, metadata)?;

        let scenario = match gpu {
            GpuSetup::Arg(arg) => Err(arg),
            GpuSetup::SimPerTenant => Ok(sim_scenario(&tenants, &cgroup_root)),
            GpuSetup::Scenario(yaml) => Ok(yaml),
        };
        let gpu_arg = match scenario {
            Err(arg) => arg,
            Ok(yaml) => {
                let path = files.path().join("scenario.yaml");
                std::fs::write(&path, yaml)?;
                format!("sim:{}", path.display())
            }
        };
        let mut args =
            vec!["--gpu".to_string(), gpu_arg, "--pod-metadata".to_string(), metadata_path.display().to_string()];
        if let (Some(root), Some(name)) = (&node_root, node) {
            args.extend(["--cgroup-root".to_string(), root.display().to_string()]);
            args.extend(["--node-name".to_string(), name.to_string()]);
        }
        args.extend_from_slice(extra_args);
        let agent = AgentProcess::start(&workspace_binary("podgpu-agent"), &args)?;
        Ok(Self {
            agent,
            tenants,
            namespace: namespace.to_string(),
            cgroup_root,
            agent_args: args,
            node_root,
            _files: files,
        })
    }

    /// Stops the agent (SIGTERM) and starts a new one with the same
    /// arguments on the same gRPC address (as a restarted pod behind the
    /// same Service endpoint).
    pub fn restart_agent(&mut self) -> anyhow::Result<()> {
        let keda = self.agent.keda;
        self.agent.stop(std::time::Duration::from_secs(5));
        let mut args = self.agent_args.clone();
        args.extend(["--keda-listen".to_string(), keda.to_string()]);
        self.agent = AgentProcess::start(&workspace_binary("podgpu-agent"), &args)?;
        Ok(())
    }

    /// Stops the agent and its tenants and removes the simulated node's root.
    fn teardown(&mut self) {
        self.agent.stop(std::time::Duration::from_secs(5));
        self.tenants.clear();
        if let Some(root) = &self.node_root {
            let _ = std::fs::remove_dir(root.join("kubepods.slice"));
            let _ = std::fs::remove_dir(root);
        }
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> &Tenant {
        self.tenants.iter().find(|t| t.spec.name == name).unwrap_or_else(|| panic!("no tenant {name}"))
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn sim_scenario(tenants: &[Tenant], cgroup_root: &std::path::Path) -> String {
    let mut yaml = String::from(
        "name: scene\ngpus:\n  - {uuid: GPU-00000000-0000-4000-8000-5ce4e0000000, name: Simulated GPU, memory_total_bytes: 85899345920}\nprocesses:\n",
    );
    if tenants.iter().all(|t| t.spec.gpu_steps.is_empty()) {
        yaml.push_str("  []\n");
    }
    for tenant in tenants.iter().filter(|t| !t.spec.gpu_steps.is_empty()) {
        let steps: Vec<String> = tenant
            .spec
            .gpu_steps
            .iter()
            .map(|(seconds, percent)| format!("{{seconds: {seconds}, percent: {percent}}}"))
            .collect();
        let _ = writeln!(
            yaml,
            "  - {{cgroup: {}, gpu: 0, memory_bytes: {}, sm_util: [{}]}}",
            tenant.pod.relative_pod_path(cgroup_root),
            tenant.spec.gpu_memory_bytes,
            steps.join(", ")
        );
    }
    yaml
}
