//! The Helm chart, checked by a real helm (pinned, installed by
//! `scripts/setup.sh` through `scripts/install-helm.sh`): it lints and
//! renders for the default values and every documented variant, the
//! rendered DaemonSet runs with exactly what the real-node tests run the
//! agent with (`integration/tests/daemonset.rs` reads the template), each
//! variant renders what it promises, and every value a template uses
//! exists in `values.yaml`.
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::container::ChartAgent;
use serde_yaml::Value;

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart")
}

/// helm with `args` on the chart; its stdout.
fn helm(args: &[&str]) -> String {
    let output = Command::new("helm")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("helm not found ({err}): scripts/setup.sh installs it"));
    assert!(
        output.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The documented variants, as `--set` lists.
const VARIANTS: [(&str, &[&str]); 12] = [
    ("default", &[]),
    ("tls", &["tls.secretName=podgpu-tls"]),
    ("mtls", &["tls.secretName=podgpu-tls", "tls.requireClientCert=true"]),
    ("no API access", &["kubernetesApi=false"]),
    ("static metadata", &["kubernetesApi=false", "podMetadata=pods: []"]),
    ("launch accounting", &["launchAccounting=false", "launchOverheadBudget=0.5"]),
    (
        "network policy locked to KEDA's namespace",
        &[
            "networkPolicy.kedaNamespaceLabels.kubernetes\\.io/metadata\\.name=keda",
            "priorityClassName=system-node-critical",
        ],
    ),
    ("service monitor", &["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prometheus"]),
    ("grafana dashboard", &["grafanaDashboard.enabled=true"]),
    ("runtime seccomp, json logs", &["seccomp.profile=runtimeDefault", "logFormat=json"]),
    ("unconfined", &["seccomp.profile=unconfined"]),
    ("no uprobes", &["uprobes=false", "driverHooks=tracepoints"]),
];

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter().flat_map(|set| ["--set".to_string(), set.to_string()]).collect()
}

/// Every document `helm template` renders with `sets`.
fn render(sets: &[&str]) -> Vec<Value> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template".to_string(), "podgpu".into(), chart, "--namespace".into(), "podgpu".into()];
    args.extend(set_args(sets));
    let text = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("rendered YAML parses"))
        .filter(|document| !document.is_null())
        .collect()
}

use serde::Deserialize as _;

fn find<'a>(documents: &'a [Value], kind: &str) -> Option<&'a Value> {
    documents.iter().find(|document| document["kind"] == kind)
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn args(workload: &Value) -> Vec<String> {
    container(workload)["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

#[test]
fn the_chart_lints_and_renders_for_every_documented_variant() {
    let chart = chart_dir().display().to_string();
    for (name, sets) in VARIANTS {
        let mut args = vec!["lint".to_string(), chart.clone(), "--strict".into()];
        args.extend(set_args(sets));
        helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let documents = render(sets);
        for kind in ["DaemonSet", "Deployment", "Service"] {
            assert!(find(&documents, kind).is_some(), "{name}: no {kind}");
        }
    }
}

/// The rendered DaemonSet has the capabilities, host PID namespace and
/// hostPath mounts the real-node test gives the agent's container.
#[test]
fn the_rendered_daemonset_is_what_the_real_node_tests_run() {
    let documents = render(&[]);
    let daemonset = find(&documents, "DaemonSet").unwrap();
    let tested = ChartAgent::read(&chart_dir()).expect("the template reads");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(tested.host_pid));
    let security = &container(daemonset)["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    let list = |value: &Value| -> Vec<String> {
        value.as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(list(&security["capabilities"]["drop"]), vec!["ALL"]);
    assert_eq!(list(&security["capabilities"]["add"]), tested.capabilities);
    let volumes = pod["volumes"].as_sequence().unwrap();
    let mut rendered = Vec::new();
    for mount in container(daemonset)["volumeMounts"].as_sequence().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let volume = volumes.iter().find(|v| v["name"] == name).unwrap();
        let Some(host_path) = volume["hostPath"]["path"].as_str() else { continue };
        rendered.push((
            name.to_string(),
            mount["mountPath"].as_str().unwrap().to_string(),
            host_path.to_string(),
            mount["readOnly"].as_bool().unwrap_or(false),
        ));
    }
    let tested_mounts: Vec<_> = tested
        .mounts
        .iter()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.host_path.clone(), m.read_only))
        .collect();
    assert_eq!(rendered, tested_mounts);
    assert_eq!(args(daemonset)[0], "node");
    assert!(args(daemonset).contains(&"--launch-accounting=on".to_string()));
    assert!(args(daemonset).contains(&"--driver-path=auto".to_string()));
    assert!(args(daemonset).contains(&"--driver-hooks=auto".to_string()));

    // The seccomp profile the DaemonSet test runs the agent under is the
    // one the init container writes where the agent's Localhost profile
    // points.
    assert!(tested.seccomp.is_some(), "the default gives the agent its own profile");
    assert_eq!(security["seccompProfile"]["type"].as_str(), Some("Localhost"));
    let profile = security["seccompProfile"]["localhostProfile"].as_str().unwrap();
    let init = &pod["initContainers"][0];
    let init_args: Vec<String> =
        init["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
    assert_eq!(init_args[0], "seccomp-profile");
    let seccomp_dir =
        volumes.iter().find(|v| v["name"] == "seccomp-dir").unwrap()["hostPath"]["path"].as_str().unwrap();
    let mount = &init["volumeMounts"][0];
    assert_eq!(mount["name"].as_str(), Some("seccomp-dir"));
    assert!(seccomp_dir.ends_with("/kubelet/seccomp"), "{seccomp_dir}");
    let written = format!("--write={}/{profile}", mount["mountPath"].as_str().unwrap());
    assert!(init_args.contains(&written), "{init_args:?} does not write {written}");
}

/// The init container's output is the profile the chart ships: the agent
/// embeds `files/seccomp-agent.json` and writes it unchanged, atomically.
#[test]
fn the_agent_writes_the_charts_seccomp_profile() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("podgpu/agent.json");
    let status = std::process::Command::new(integration::workspace_binary("podgpu-agent"))
        .args(["seccomp-profile", "--write", &target.display().to_string()])
        .status()
        .expect("podgpu-agent runs");
    assert!(status.success());
    let shipped = std::fs::read_to_string(chart_dir().join("files/seccomp-agent.json")).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), shipped);
    let profile: serde_json::Value = serde_json::from_str(&shipped).unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "an allowlist");
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()))
        .collect();
    for needed in ["bpf", "perf_event_open", "execve"] {
        assert!(allowed.contains(&needed), "{needed} must be allowed");
    }
    for denied in
        ["mount", "ptrace", "process_vm_readv", "init_module", "kexec_load", "setns", "unshare", "io_uring_setup"]
    {
        assert!(!allowed.contains(&denied), "{denied} must not be allowed");
    }
}

#[test]
fn each_variant_renders_what_it_promises() {
    let has = |documents: &[Value], kind: &str, flag: &str| {
        args(find(documents, kind).unwrap()).iter().any(|a| a.starts_with(flag))
    };

    let runtime = render(VARIANTS[9].1);
    let daemonset = find(&runtime, "DaemonSet").unwrap();
    assert_eq!(container(daemonset)["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    assert!(daemonset["spec"]["template"]["spec"]["initContainers"].is_null(), "no profile to install");
    assert!(has(&runtime, "DaemonSet", "--log-format=json") && has(&runtime, "Deployment", "--log-format=json"));
    let unconfined = render(VARIANTS[10].1);
    let daemonset = find(&unconfined, "DaemonSet").unwrap();
    assert_eq!(container(daemonset)["securityContext"]["seccompProfile"]["type"].as_str(), Some("Unconfined"));

    // Uprobes need SYS_ADMIN: the default adds it, uprobes=false leaves it
    // out and turns launch accounting off.
    let capabilities = |documents: &[Value]| -> Vec<String> {
        container(find(documents, "DaemonSet").unwrap())["securityContext"]["capabilities"]["add"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(capabilities(&render(&[])), ["BPF", "PERFMON", "SYS_PTRACE", "SYS_ADMIN"]);
    assert!(has(&render(&[]), "DaemonSet", "--launch-accounting=on"));
    let no_uprobes = render(VARIANTS[11].1);
    assert_eq!(capabilities(&no_uprobes), ["BPF", "PERFMON", "SYS_PTRACE"]);
    assert!(has(&no_uprobes, "DaemonSet", "--launch-accounting=off"));
    assert!(has(&no_uprobes, "DaemonSet", "--driver-hooks=tracepoints"));

    let tls = render(VARIANTS[1].1);
    assert!(has(&tls, "DaemonSet", "--tls-cert=") && !has(&tls, "DaemonSet", "--tls-client-ca="));
    assert!(has(&tls, "Deployment", "--node-tls-ca="));
    let secret_volume = |documents: &[Value], kind: &str| {
        find(documents, kind).unwrap()["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "podgpu-tls")
    };
    assert!(secret_volume(&tls, "DaemonSet") && secret_volume(&tls, "Deployment"));

    let mtls = render(VARIANTS[2].1);
    assert!(has(&mtls, "DaemonSet", "--tls-client-ca=") && has(&mtls, "Deployment", "--tls-client-ca="));
    assert!(has(&mtls, "Deployment", "--node-tls-cert="));

    let no_api = render(VARIANTS[3].1);
    assert!(has(&no_api, "DaemonSet", "--kube-api=off"));
    assert!(find(&no_api, "ClusterRole").is_none() && find(&no_api, "ServiceAccount").is_none());
    let pod = &find(&no_api, "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert!(find(&render(&[]), "ClusterRole").is_some(), "the default reads the API");

    let metadata = render(VARIANTS[4].1);
    assert!(has(&metadata, "DaemonSet", "--pod-metadata=/etc/podgpu/pods.yaml"));
    assert_eq!(find(&metadata, "ConfigMap").unwrap()["data"]["pods.yaml"], "pods: []");

    let locked = render(VARIANTS[6].1);
    let policies: Vec<&Value> = locked.iter().filter(|d| d["kind"] == "NetworkPolicy").collect();
    assert_eq!(policies.len(), 2);
    let policy = |suffix: &str| *policies.iter().find(|p| p["metadata"]["name"] == format!("podgpu-{suffix}")).unwrap();
    // The peers of the rule for `port`.
    let peers = |policy: &Value, port: &str| {
        policy["spec"]["ingress"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|rule| rule["ports"][0]["port"] == port)
            .map(|rule| rule["from"].as_sequence().unwrap().clone())
            .unwrap()
    };
    let grpc_from = |policy: &Value| peers(policy, "keda")[0].clone();
    assert_eq!(grpc_from(policy("scaler"))["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "keda");
    assert_eq!(grpc_from(policy("agent"))["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "podgpu-scaler");
    let daemonset = &find(&locked, "DaemonSet").unwrap()["spec"];
    assert_eq!(daemonset["template"]["spec"]["priorityClassName"], "system-node-critical");
    // On by default: the node API is the scaler's alone; KEDA's port is
    // open to any namespace until KEDA's is named.
    let defaults = render(&[]);
    let default_policies: Vec<&Value> = defaults.iter().filter(|d| d["kind"] == "NetworkPolicy").collect();
    assert_eq!(default_policies.len(), 2, "on by default");
    let default_policy =
        |suffix: &str| *default_policies.iter().find(|p| p["metadata"]["name"] == format!("podgpu-{suffix}")).unwrap();
    assert_eq!(
        grpc_from(default_policy("agent"))["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "podgpu-scaler"
    );
    let any: Value = serde_yaml::from_str("{}").unwrap();
    assert_eq!(grpc_from(default_policy("scaler"))["namespaceSelector"], any);
    // HTTP (/pods, /metrics) from Prometheus's pods only, in any namespace:
    // one peer, so both selectors must match.
    for suffix in ["agent", "scaler"] {
        let http = peers(default_policy(suffix), "http");
        assert_eq!(http.len(), 1, "{suffix}: {http:?}");
        assert_eq!(http[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "prometheus", "{suffix}");
        assert_eq!(http[0]["namespaceSelector"], any, "{suffix}");
    }
    // Another scraper replaces Prometheus (not both labels required), or
    // every pod of the selected namespaces.
    let scraper = render(&["networkPolicy.metricsPodSelector.matchLabels.app=vmagent"]);
    let scraper_policy = scraper.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    let scraper_labels = &peers(scraper_policy, "http")[0]["podSelector"]["matchLabels"];
    assert_eq!(scraper_labels.as_mapping().map(|m| m.len()), Some(1), "{scraper_labels:?}");
    assert_eq!(scraper_labels["app"], "vmagent");
    let open = render(&["networkPolicy.metricsFromEveryPod=true"]);
    let open_policy = open.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    assert!(peers(open_policy, "http")[0]["podSelector"].is_null(), "every pod");
    assert!(find(&render(&["networkPolicy.enabled=false"]), "NetworkPolicy").is_none(), "can be turned off");

    let defaults = render(&[]);
    let daemonset = &find(&defaults, "DaemonSet").unwrap()["spec"];
    assert_eq!(daemonset["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(1));
    let scaler = &find(&defaults, "Deployment").unwrap()["spec"]["template"]["spec"];
    assert_eq!(
        scaler["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(find(&defaults, "PodDisruptionBudget").unwrap()["spec"]["minAvailable"].as_u64(), Some(1));
    assert!(find(&render(&["scaler.replicas=1"]), "PodDisruptionBudget").is_none(), "no PDB for one replica");

    let monitored = render(VARIANTS[7].1);
    let monitor = find(&monitored, "ServiceMonitor").unwrap();
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        (&monitor["spec"]["endpoints"][0]["port"], &monitor["spec"]["endpoints"][0]["path"]),
        (&Value::from("http"), &Value::from("/metrics"))
    );
    // Both Services it selects expose `http`: the agents' and the scaler's.
    let services: Vec<&Value> = monitored.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 2);
    assert!(services.iter().all(|s| s["spec"]["ports"].as_sequence().unwrap().iter().any(|p| p["name"] == "http")));
    assert!(find(&defaults, "ServiceMonitor").is_none(), "off by default");

    let dashboards = render(VARIANTS[8].1);
    let dashboard = find(&dashboards, "ConfigMap").expect("the dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], Value::from("1"));
    let json: serde_json::Value = serde_json::from_str(dashboard["data"]["podgpu.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "podgpu-overview");
    assert!(find(&defaults, "ConfigMap").is_none(), "off by default");

    let launches = render(VARIANTS[5].1);
    assert!(has(&launches, "DaemonSet", "--launch-accounting=off"));
    assert!(has(&launches, "DaemonSet", "--launch-overhead-budget=0.5"));
}

/// Every `.Values.x.y` a template names exists in values.yaml and in
/// values.schema.json: a typo would otherwise render as an empty string.
#[test]
fn every_value_the_templates_use_exists() {
    let read = |name: &str| std::fs::read_to_string(chart_dir().join(name)).unwrap();
    let values: Value = serde_yaml::from_str(&read("values.yaml")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&read("values.schema.json")).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(chart_dir().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices(".Values.") {
            let key: String = text[at + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let (mut node, mut described) = (&values, &schema);
            for part in key.trim_end_matches('.').split('.') {
                let missing = |file: &str| format!("{}: .Values.{key} is not in {file}", path.display());
                node = node.get(part).unwrap_or_else(|| panic!("{}", missing("values.yaml")));
                described =
                    described["properties"].get(part).unwrap_or_else(|| panic!("{}", missing("values.schema.json")));
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "found only {checked} value references");
}

/// The schema refuses values the agent would refuse at start (or a typo'd
/// key, which would silently do nothing), at `helm install` time.
#[test]
fn the_schema_refuses_bad_values() {
    let chart = chart_dir().display().to_string();
    for set in ["gpu=cuda", "tickMs=5", "ports.keda=70000", "launchOverheadBudget=0", "tls.secretNme=x"] {
        let output = Command::new("helm").args(["lint", &chart, "--set", set]).output().expect("helm runs");
        assert!(!output.status.success(), "helm lint accepted --set {set}");
    }
}

/// The example ScaledObjects (`chart/examples/`) are what podgpu accepts:
/// every podgpu trigger's metadata passes the agent's own validation, and
/// every example carries the `fallback` block podgpu's errors rely on.
#[test]
fn the_example_scaled_objects_are_valid() {
    let mut triggers = 0;
    let mut examples = 0;
    for entry in std::fs::read_dir(chart_dir().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = Value::deserialize(document).unwrap();
            if object["kind"] != "ScaledObject" {
                continue;
            }
            examples += 1;
            let spec = &object["spec"];
            assert!(spec["fallback"]["replicas"].as_u64().is_some(), "{}: no fallback", path.display());
            for trigger in spec["triggers"].as_sequence().unwrap() {
                let kind = trigger["type"].as_str().unwrap();
                assert!(matches!(kind, "external" | "external-push"), "{}: trigger type {kind}", path.display());
                let metadata: std::collections::HashMap<String, String> =
                    serde_yaml::from_value(trigger["metadata"].clone()).unwrap();
                assert!(metadata.contains_key("scalerAddress"), "{}", path.display());
                if let Err(err) = podgpu_agent::serve::trigger::Trigger::from_metadata(&metadata) {
                    panic!("{}: {err}", path.display());
                }
                triggers += 1;
            }
        }
    }
    assert!(examples >= 6 && triggers >= 6, "{examples} examples, {triggers} triggers");
}
