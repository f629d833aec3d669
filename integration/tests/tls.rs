//! TLS and mTLS on the gRPC ports, with certificates made for the test: a
//! node agent requiring client certificates answers a KEDA client that
//! presents one and refuses clients that do not (or speak plaintext); a
//! scaler reaches that node over mTLS and serves KEDA over TLS itself.
use integration::require_root;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::agent::AgentProcess;
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::workspace_binary;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

const SERVER_NAME: &str = "podgpu.podgpu-system.svc";
const ROTATED_NAME: &str = "podgpu-renewed.podgpu-system.svc";

/// PEM files of one test PKI.
struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    ca: Vec<u8>,
    client_cert: Vec<u8>,
    client_key: Vec<u8>,
    /// A client identity signed by a CA the agent does not trust.
    rogue_cert: Vec<u8>,
    rogue_key: Vec<u8>,
}

fn signed(
    purpose: ExtendedKeyUsagePurpose,
    names: Vec<String>,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> (String, String) {
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().unwrap();
    (params.signed_by(&key, ca, ca_key).unwrap().pem(), key.serialize_pem())
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

/// Writes server files into `dir` and returns what clients hold.
fn make_pki(dir: &Path) -> Pki {
    let (ca_cert, ca_key) = ca("podgpu test CA");
    let (server_cert, server_key) =
        signed(ExtendedKeyUsagePurpose::ServerAuth, vec![SERVER_NAME.into()], &ca_cert, &ca_key);
    let (client_cert, client_key) = signed(ExtendedKeyUsagePurpose::ClientAuth, vec!["keda".into()], &ca_cert, &ca_key);
    let (rogue_ca, rogue_ca_key) = ca("someone else");
    let (rogue_cert, rogue_key) =
        signed(ExtendedKeyUsagePurpose::ClientAuth, vec!["keda".into()], &rogue_ca, &rogue_ca_key);
    for (name, pem) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server-key.pem", server_key),
        ("client.pem", client_cert.clone()),
        ("client-key.pem", client_key.clone()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    Pki {
        ca: ca_cert.pem().into_bytes(),
        ca_cert,
        ca_key,
        client_cert: client_cert.into_bytes(),
        client_key: client_key.into_bytes(),
        rogue_cert: rogue_cert.into_bytes(),
        rogue_key: rogue_key.into_bytes(),
    }
}

fn path_arg(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// mTLS required: only a client with a certificate from the trusted CA is
/// answered; the scaler reaches the node with its own client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let ns = format!("tls-{}", std::process::id());
    let mut args: Vec<String> = ["--tick-ms", "100", "--tls-reload-s", "1"].map(String::from).to_vec();
    args.extend([
        "--tls-cert".into(),
        path_arg(dir.path(), "server.pem"),
        "--tls-key".into(),
        path_arg(dir.path(), "server-key.pem"),
        "--tls-client-ca".into(),
        path_arg(dir.path(), "ca.pem"),
    ]);
    let scene = Scene::start(&ns, &[TenantSpec::new("llm-0", "llm")], GpuSetup::Arg("none".into()), &args)
        .expect("scene starts");
    let trigger = scaled_object(&ns, "llm", &[("metric", "requests_in_flight"), ("target", "4")]);
    let addr = scene.agent.keda;

    let mut keda = KedaClient::connect_tls(addr, SERVER_NAME, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .expect("mTLS client connects");
    let specs = keda.metric_spec(&trigger).await.expect("GetMetricSpec over mTLS");
    assert_eq!(specs[0].metric_name, "podgpu-requests-in-flight");

    // No certificate: the handshake or the first call must fail.
    let refused = match KedaClient::connect_tls(addr, SERVER_NAME, &pki.ca, None).await {
        Err(_) => true,
        Ok(mut client) => client.metric_spec(&trigger).await.is_err(),
    };
    assert!(refused, "a client without a certificate was answered");
    let rogue = match KedaClient::connect_tls(addr, SERVER_NAME, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key))).await
    {
        Err(_) => true,
        Ok(mut client) => client.metric_spec(&trigger).await.is_err(),
    };
    assert!(rogue, "a client certificate from an untrusted CA was answered");
    let plaintext = match KedaClient::connect(addr).await {
        Err(_) => true,
        Ok(mut client) => client.metric_spec(&trigger).await.is_err(),
    };
    assert!(plaintext, "a plaintext client was answered on a TLS port");

    // The scaler: mTLS towards the node, TLS (no client certificates) to KEDA.
    let scaler_args: Vec<String> = [
        "--nodes",
        &addr.to_string(),
        "--poll-ms",
        "200",
        "--node-tls-ca",
        &path_arg(dir.path(), "ca.pem"),
        "--node-tls-cert",
        &path_arg(dir.path(), "client.pem"),
        "--node-tls-key",
        &path_arg(dir.path(), "client-key.pem"),
        "--node-tls-server-name",
        SERVER_NAME,
        "--tls-cert",
        &path_arg(dir.path(), "server.pem"),
        "--tls-key",
        &path_arg(dir.path(), "server-key.pem"),
    ]
    .map(String::from)
    .to_vec();
    let scaler =
        AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &scaler_args).expect("scaler starts");
    let deadline = Instant::now() + Duration::from_secs(5);
    let health = loop {
        let health: serde_json::Value =
            serde_json::from_slice(&get(scaler.http, "/healthz").await.unwrap().body).unwrap();
        if health["nodes_covered"].as_u64() == Some(1) || Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["nodes_covered"].as_u64(), Some(1), "scaler did not reach the node over mTLS: {health}");
    let mut via_scaler = KedaClient::connect_tls(scaler.keda, SERVER_NAME, &pki.ca, None).await.expect("TLS to scaler");
    let poll = via_scaler.poll(&trigger, "podgpu-requests-in-flight").await.expect("poll through the scaler");
    assert_eq!(poll.value, 0.0);
    // The scaler fetches the pods triggers select: the trigger's pod now.
    let health: serde_json::Value = serde_json::from_slice(&get(scaler.http, "/healthz").await.unwrap().body).unwrap();
    assert_eq!(health["nodes"][0]["pods"].as_u64(), Some(1), "{health}");

    // Rotation without a restart: the node's certificate is renewed for
    // another name (files replaced by rename, as a Secret volume does);
    // within the reload interval clients see the new one.
    let (renewed_cert, renewed_key) =
        signed(ExtendedKeyUsagePurpose::ServerAuth, vec![ROTATED_NAME.into()], &pki.ca_cert, &pki.ca_key);
    for (name, pem) in [("server-key.pem", renewed_key), ("server.pem", renewed_cert)] {
        let staged = dir.path().join(format!("{name}.new"));
        std::fs::write(&staged, pem).unwrap();
        std::fs::rename(&staged, dir.path().join(name)).unwrap();
    }
    let identity = Some((&pki.client_cert[..], &pki.client_key[..]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let renewed = match KedaClient::connect_tls(addr, ROTATED_NAME, &pki.ca, identity).await {
            Ok(mut client) => client.metric_spec(&trigger).await.is_ok(),
            Err(_) => false,
        };
        if renewed {
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_name = match KedaClient::connect_tls(addr, SERVER_NAME, &pki.ca, identity).await {
        Err(_) => true,
        Ok(mut client) => client.metric_spec(&trigger).await.is_err(),
    };
    assert!(old_name, "the old certificate is still served after the reload");
}

/// A swapped key file is refused at start with the flag's name.
#[test]
fn bad_tls_files_fail_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let output = std::process::Command::new(workspace_binary("podgpu-agent"))
        .args(["scaler", "--nodes", "127.0.0.1:1", "--keda-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--tls-cert", &path_arg(dir.path(), "server.pem"), "--tls-key", &path_arg(dir.path(), "server.pem")])
        .output()
        .expect("agent runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-key") && stderr.contains("PRIVATE KEY"), "{stderr}");
}
