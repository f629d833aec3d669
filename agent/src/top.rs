//! `podgpu-agent top`: a live terminal view of one node agent's pods and
//! GPUs, or of the whole cluster through the scaler, read from `/pods`
//! once a second: a header line per GPU (utilization, memory, sharing
//! mode, how sure the per-pod split is, switching overhead) or, through
//! the scaler, per node, and a table of pods (GPU share and its
//! confidence, NVML's share, memory, requests in flight, request rate,
//! TTFT p50/p99).
//! Keys: `s` or Tab sorts by the next column, `r` reverses, `q` or Esc
//! quits. `--namespace` and `--selector` filter the pods.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use crate::agent_http;
use crate::pods::selector::LabelSelector;

/// What `top` shows and where it reads it.
#[derive(Clone, Debug)]
pub struct TopConfig {
    /// The agent's HTTP address.
    pub agent: SocketAddr,
    /// Window of the per-pod values, seconds.
    pub window_s: f64,
    /// Only pods of this namespace.
    pub namespace: Option<String>,
    /// Only pods whose labels match.
    pub selector: Option<LabelSelector>,
    /// Time between reads.
    pub interval: Duration,
    /// Quit on its own after this long (the demo shows the view for the
    /// length of its load); `None`: until `q`.
    pub exit_after: Option<Duration>,
}

/// The table's columns, in order: header and how a row sorts.
const COLUMNS: [&str; 12] =
    ["POD", "GPU %", "CONF", "NVML %", "MEM", "IN FLIGHT", "REQ/S", "TTFT P50", "TTFT P99", "ENGINE", "QUEUE", "KV %"];

/// One pod as shown.
#[derive(Clone, Debug, Default, PartialEq)]
struct PodLine {
    pod: String,
    gpu: Option<f64>,
    confidence: Option<f64>,
    nvml: Option<f64>,
    memory: Option<f64>,
    in_flight: Option<f64>,
    rate: Option<f64>,
    ttft_p50: Option<f64>,
    ttft_p99: Option<f64>,
    /// The engine found (`?`: none; `!`-prefixed: found but failing).
    engine: String,
    queue: Option<f64>,
    kv_cache: Option<f64>,
}

impl PodLine {
    fn key(&self, column: usize) -> Option<f64> {
        [
            None,
            self.gpu,
            self.confidence,
            self.nvml,
            self.memory,
            self.in_flight,
            self.rate,
            self.ttft_p50,
            self.ttft_p99,
            None,
            self.queue,
            self.kv_cache,
        ][column]
    }

    fn cells(&self) -> [String; 12] {
        let number = |value: Option<f64>, digits: usize| value.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        [
            self.pod.clone(),
            number(self.gpu, 1),
            number(self.confidence, 2),
            number(self.nvml, 1),
            self.memory.map_or("-".to_string(), bytes),
            number(self.in_flight, 0),
            number(self.rate, 1),
            self.ttft_p50.map_or("-".to_string(), |ms| format!("{ms:.0} ms")),
            self.ttft_p99.map_or("-".to_string(), |ms| format!("{ms:.0} ms")),
            self.engine.clone(),
            number(self.queue, 0),
            number(self.kv_cache, 0),
        ]
    }
}

fn bytes(value: f64) -> String {
    format!("{:.1} GiB", value / f64::from(1u32 << 30))
}

/// What one read gives: GPU header lines and pod lines.
#[derive(Clone, Debug, Default, PartialEq)]
struct Snapshot {
    gpus: Vec<String>,
    pods: Vec<PodLine>,
}

/// Turns `/pods` into what the screen shows, filtered.
fn snapshot(body: &serde_json::Value, config: &TopConfig) -> Snapshot {
    // The scaler answers with nodes instead of GPUs.
    let nodes = body["nodes"].as_array().into_iter().flatten().map(|n| {
        format!(
            "node {}: {} pods, snapshot {:.1} s old",
            n["name"].as_str().unwrap_or("?"),
            n["pods"].as_u64().unwrap_or(0),
            n["snapshot_age_s"].as_f64().unwrap_or(f64::NAN)
        )
    });
    let gpus = body["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let percent = |key: &str| d[key].as_f64().map_or("-".to_string(), |v| format!("{v:.0}%"));
            format!(
                "{} {}  util {}  mem {} / {}  {}  split confidence {}  switching {}",
                d["uuid"].as_str().unwrap_or("?"),
                d["name"].as_str().unwrap_or(""),
                percent("util_percent"),
                bytes(d["memory_used_bytes"].as_f64().unwrap_or(0.0)),
                bytes(d["memory_total_bytes"].as_f64().unwrap_or(0.0)),
                d["sharing"].as_str().unwrap_or("?"),
                d["attribution_confidence"].as_f64().map_or("-".to_string(), |c| format!("{c:.2}")),
                percent("sharing_overhead_percent"),
            )
        })
        .chain(nodes)
        .collect();
    let pods = body["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| config.namespace.as_deref().is_none_or(|ns| pod["namespace"].as_str() == Some(ns)))
        .filter(|pod| {
            config.selector.as_ref().is_none_or(|selector| {
                let labels = serde_json::from_value(pod["labels"].clone()).unwrap_or_default();
                selector.matches(&labels)
            })
        })
        .map(|pod| {
            let value = |name: &str| pod["values"][name].as_f64();
            let name = match (pod["namespace"].as_str(), pod["name"].as_str()) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                _ => pod["uid"].as_str().unwrap_or("?").to_string(),
            };
            PodLine {
                pod: name,
                gpu: value("gpu_sm_util"),
                confidence: pod["gpu_attribution_confidence"].as_f64(),
                nvml: value("gpu_sm_util_nvml"),
                memory: value("gpu_mem_used_bytes"),
                in_flight: value("requests_in_flight"),
                rate: value("request_rate"),
                ttft_p50: value("ttft_ms_p50"),
                ttft_p99: value("ttft_ms_p99"),
                engine: engine_cell(&pod["engine"]),
                queue: value("engine_requests_waiting"),
                kv_cache: value("kv_cache_usage"),
            }
        })
        .collect();
    Snapshot { gpus, pods }
}

/// An engine as a cell: its name while it is read, `!name` while its
/// endpoint fails, `?` where none was found (/pods says why).
fn engine_cell(engine: &serde_json::Value) -> String {
    match (engine["engine"].as_str(), engine["unavailable"].is_null()) {
        (Some(name), true) => name.to_string(),
        (Some(name), false) => format!("!{name}"),
        (None, _) => "?".to_string(),
    }
}

/// Sorts by `column` (numbers descending unless `reversed`; names
/// ascending unless `reversed`); missing values go last.
fn sort(pods: &mut [PodLine], column: usize, reversed: bool) {
    pods.sort_by(|a, b| {
        let order = if column == 0 {
            a.pod.cmp(&b.pod)
        } else {
            match (a.key(column), b.key(column)) {
                (Some(x), Some(y)) => y.total_cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => a.pod.cmp(&b.pod),
            }
        };
        if reversed {
            order.reverse()
        } else {
            order
        }
    });
}

/// Runs the view until `q`, Esc or Ctrl-C (or `exit_after`).
pub fn run(config: &TopConfig) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    anyhow::ensure!(std::io::stdout().is_terminal(), "top draws on a terminal; use /pods for scripts");
    let mut terminal = ratatui::init();
    let outcome = event_loop(&mut terminal, config);
    ratatui::restore();
    outcome
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, config: &TopConfig) -> anyhow::Result<()> {
    let mut path = format!("/pods?window={}", config.window_s);
    let (mut column, mut reversed) = (1, false);
    let mut shown = Snapshot::default();
    let mut status = String::from("connecting");
    let mut read_at: Option<Instant> = None;
    let started = Instant::now();
    loop {
        if config.exit_after.is_some_and(|after| started.elapsed() >= after) {
            return Ok(());
        }
        if read_at.is_none_or(|at| at.elapsed() >= config.interval) {
            read_at = Some(Instant::now());
            let mut read = agent_http::get_json(config.agent, &path);
            if read.as_ref().is_err_and(|err| err.starts_with("http/1.1 400")) && path != "/pods" {
                // The scaler serves only the windows its nodes carry: take
                // its default.
                path = "/pods".to_string();
                read = agent_http::get_json(config.agent, &path);
            }
            match read {
                Ok(body) => {
                    shown = snapshot(&body, config);
                    status = format!("{} pods", shown.pods.len());
                }
                Err(err) => status = format!("cannot read {}: {err}", config.agent),
            }
        }
        sort(&mut shown.pods, column, reversed);
        terminal
            .draw(|frame| {
                let [header, table, footer] = Layout::vertical([
                    Constraint::Length(shown.gpus.len().max(1) as u16 + 2),
                    Constraint::Min(3),
                    Constraint::Length(1),
                ])
                .areas(frame.area());
                let gpus: Vec<Line> = if shown.gpus.is_empty() {
                    vec![Line::from("no GPU")]
                } else {
                    shown.gpus.iter().map(|g| Line::from(g.as_str())).collect()
                };
                frame.render_widget(
                    Paragraph::new(gpus).block(Block::bordered().title(format!(" podgpu top: {} ", config.agent))),
                    header,
                );
                let titles = COLUMNS.iter().enumerate().map(|(index, title)| {
                    if index == column {
                        format!("{title} {}", if reversed { "^" } else { "v" })
                    } else {
                        title.to_string()
                    }
                });
                let rows = shown.pods.iter().map(|pod| Row::new(pod.cells()));
                let widths = [
                    Constraint::Min(24),
                    Constraint::Length(8),
                    Constraint::Length(6),
                    Constraint::Length(8),
                    Constraint::Length(10),
                    Constraint::Length(11),
                    Constraint::Length(8),
                    Constraint::Length(10),
                    Constraint::Length(10),
                    Constraint::Length(13),
                    Constraint::Length(6),
                    Constraint::Length(5),
                ];
                frame.render_widget(
                    Table::new(rows, widths)
                        .header(Row::new(titles).style(Style::default().add_modifier(Modifier::BOLD)))
                        .block(Block::bordered()),
                    table,
                );
                frame.render_widget(Paragraph::new(format!("{status}   s/Tab: sort   r: reverse   q: quit")), footer);
            })
            .context("drawing")?;
        if event::poll(Duration::from_millis(100)).context("reading keys")? {
            if let Event::Key(key) = event::read().context("reading keys")? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                // Raw mode turns Ctrl-C into a key, not a signal.
                if key.code == KeyCode::Char('c') && key.modifiers.contains(event::KeyModifiers::CONTROL) {
                    return Ok(());
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('s') | KeyCode::Tab => column = (column + 1) % COLUMNS.len(),
                    KeyCode::BackTab => column = (column + COLUMNS.len() - 1) % COLUMNS.len(),
                    KeyCode::Char('r') => reversed = !reversed,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TopConfig {
        TopConfig {
            agent: "127.0.0.1:1".parse().unwrap(),
            window_s: 10.0,
            namespace: None,
            selector: None,
            interval: Duration::from_secs(1),
            exit_after: None,
        }
    }

    fn body() -> serde_json::Value {
        serde_json::json!({
            "devices": [{"uuid": "GPU-1", "name": "H100", "util_percent": 62.0, "memory_used_bytes": 1073741824u64,
                          "memory_total_bytes": 85899345920u64, "sharing": "time_sliced", "attribution_confidence": 0.9,
                          "sharing_overhead_percent": 2.0}],
            "pods": [
                {"uid": "a", "namespace": "ml", "name": "llm-a", "labels": {"app": "llm"}, "gpu_attribution_confidence": 0.9,
                 "values": {"gpu_sm_util": 40.0, "gpu_sm_util_nvml": 60.0, "requests_in_flight": 3.0,
                            "engine_requests_waiting": 5.0, "kv_cache_usage": 71.0},
                 "engine": {"engine": "vllm", "unavailable": null}},
                {"uid": "b", "namespace": "ml", "name": "llm-b", "labels": {"app": "embed"},
                 "values": {"gpu_sm_util": 20.0, "requests_in_flight": 9.0},
                 "engine": {"engine": "tgi", "unavailable": "engine endpoint 10.0.0.1:80/metrics: HTTP 401"}},
                {"uid": "c", "namespace": "other", "name": "batch", "labels": {"app": "llm"}, "values": {}},
            ]
        })
    }

    /// Pods are filtered by namespace and selector; GPUs become header
    /// lines with their confidence and overhead.
    #[test]
    fn snapshot_filters_and_describes() {
        let all = snapshot(&body(), &config());
        assert_eq!(all.pods.len(), 3);
        let engines: Vec<String> = all.pods.iter().map(|p| p.cells()[9].clone()).collect();
        assert_eq!(engines, ["vllm", "!tgi", "?"], "read, failing, not found");
        assert_eq!((all.pods[0].queue, all.pods[0].kv_cache), (Some(5.0), Some(71.0)));
        let cluster = serde_json::json!({"nodes": [{"name": "gpu-7", "pods": 2, "snapshot_age_s": 0.4}], "pods": []});
        assert_eq!(snapshot(&cluster, &config()).gpus, ["node gpu-7: 2 pods, snapshot 0.4 s old"]);
        assert!(all.gpus[0].contains("util 62%") && all.gpus[0].contains("split confidence 0.90"), "{:?}", all.gpus);
        let ml = snapshot(&body(), &TopConfig { namespace: Some("ml".into()), ..config() });
        assert_eq!(ml.pods.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["ml/llm-a", "ml/llm-b"]);
        let llm =
            snapshot(&body(), &TopConfig { selector: Some(LabelSelector::parse("app=llm").unwrap()), ..config() });
        assert_eq!(llm.pods.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["ml/llm-a", "other/batch"]);
    }

    /// Sorting by a number column puts the largest first and missing values
    /// last; reversing flips it; the name column sorts by name.
    #[test]
    fn sorting() {
        let mut pods = snapshot(&body(), &config()).pods;
        sort(&mut pods, 1, false);
        assert_eq!(pods.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["ml/llm-a", "ml/llm-b", "other/batch"]);
        sort(&mut pods, 5, false);
        assert_eq!(pods[0].pod, "ml/llm-b");
        sort(&mut pods, 1, true);
        assert_eq!(pods[0].pod, "other/batch");
        sort(&mut pods, 0, false);
        assert_eq!(pods[2].pod, "other/batch");
    }
}
