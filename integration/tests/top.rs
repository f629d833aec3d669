//! `podgpu-agent top` in a real terminal: tmux runs it against an agent
//! whose pods have known simulated GPU load (as root: the agent loads its
//! eBPF probes); what is on screen is read with `capture-pane` and keys are
//! sent with `send-keys`.
use integration::require_root;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::workspace_binary;

/// A tmux server on its own socket, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("tmux (apt-get install tmux)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Waits until the screen satisfies `ready`; returns the last screen.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn line_of(screen: &str, needle: &str) -> Option<usize> {
    screen.lines().position(|line| line.contains(needle))
}

/// The GPU header and each pod's share show; pods sort by GPU share, `r`
/// reverses the order, `q` quits.
#[test]
fn top_shows_pods_sorts_and_quits() {
    require_root();
    let ns = format!("top-{}", std::process::id());
    let mut busy = TenantSpec::new("busy-0", "busy");
    busy.gpu_steps = vec![(1.0, 40.0)];
    let mut idle = TenantSpec::new("idle-0", "idle");
    idle.gpu_steps = vec![(1.0, 10.0)];
    let scene = Scene::start(&ns, &[busy, idle], GpuSetup::SimPerTenant, &["--tick-ms", "100"].map(String::from))
        .expect("scene");
    let tmux = Tmux { socket: format!("podgpu-top-{}", std::process::id()) };
    let command = format!(
        "{} top --agent {} --window-s 2 --namespace {ns}",
        workspace_binary("podgpu-agent").display(),
        scene.agent.http
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "30", &command]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));

    let screen = tmux.wait_for("both pods with their GPU share", |screen| {
        screen.lines().any(|l| l.contains("busy-0") && l.contains("40.0"))
            && screen.lines().any(|l| l.contains("idle-0") && l.contains("10.0"))
    });
    assert!(screen.contains("util 50%"), "GPU header:\n{screen}");
    assert!(screen.contains("GPU % v"), "sorted by GPU share:\n{screen}");
    assert!(line_of(&screen, "busy-0") < line_of(&screen, "idle-0"), "busiest first:\n{screen}");

    tmux.run(&["send-keys", "-t", "top", "r"]);
    let screen = tmux.wait_for("reversed order", |screen| {
        screen.contains("GPU % ^") && line_of(screen, "idle-0") < line_of(screen, "busy-0")
    });
    assert!(screen.contains("2 pods"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit on q:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// As the demo shows it: `--exit-after-s` ends the view by itself (and
/// Ctrl-C, a key in raw mode, ends it early), leaving the terminal usable.
#[test]
fn top_exits_after_its_time_and_on_ctrl_c() {
    require_root();
    let ns = format!("topexit-{}", std::process::id());
    let mut busy = TenantSpec::new("busy-0", "busy");
    busy.gpu_steps = vec![(1.0, 30.0)];
    let scene =
        Scene::start(&ns, &[busy], GpuSetup::SimPerTenant, &["--tick-ms", "100"].map(String::from)).expect("scene");
    let tmux = Tmux { socket: format!("podgpu-topexit-{}", std::process::id()) };
    let binary = workspace_binary("podgpu-agent").display().to_string();
    let view = |extra: &str| {
        format!("{binary} top --agent {} --namespace {ns} {extra}; echo TOP-ENDED; sleep 30", scene.agent.http)
    };

    let opened = Instant::now();
    tmux.run(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "30", &view("--exit-after-s 3")]);
    tmux.wait_for("the pod on screen", |screen| screen.contains("busy-0"));
    tmux.wait_for("the view ended by itself", |screen| screen.contains("TOP-ENDED"));
    let shown = opened.elapsed();
    assert!(shown >= Duration::from_secs(3), "ended after {shown:?}, before its 3 s");
    tmux.run(&["kill-session", "-t", "top"]);

    tmux.run(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "30", &view("")]);
    tmux.wait_for("the pod on screen", |screen| screen.contains("busy-0"));
    tmux.run(&["send-keys", "-t", "top", "C-c"]);
    tmux.wait_for("Ctrl-C ended the view", |screen| screen.contains("TOP-ENDED"));
}
