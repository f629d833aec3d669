//! The eBPF programs' own log: the rare conditions they meet (a map
//! refusing an insert, an HTTP/2 walk giving up, a driver call of an
//! unknown size) written with aya-log into a ring of their own, read here
//! and forwarded into `tracing` under the target `podgpu::ebpf`.
//!
//! The programs only log when `tracing` enables that target at debug level
//! when they load (`RUST_LOG=info,podgpu::ebpf=debug`); otherwise their
//! level is patched to off and a log statement costs a load and a compare.
use aya::EbpfLoader;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// The `tracing` target of the programs' records.
pub const TARGET: &str = "podgpu::ebpf";

/// aya-log's global that sets the programs' log level (`0`: off; levels
/// count up from error = 1 to trace = 5).
const LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
const LEVEL_OFF: u8 = 0;

/// Hands aya-log's records (the `log` crate's) to `tracing`.
#[derive(Clone, Copy, Debug)]
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// A loaded object's log ring.
pub type ProgramLog = EbpfLogger<ToTracing>;

/// Sets the level the programs of `loader` log at from what `tracing`
/// wants now; objects without aya-log are left alone.
pub fn set_level(loader: &mut EbpfLoader<'_>) {
    if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        loader.override_global(LEVEL_GLOBAL, &LEVEL_OFF, false);
    }
}

/// The log ring of a loaded object; `None` (said once) when it has none.
pub fn take(ebpf: &mut aya::Ebpf) -> Option<ProgramLog> {
    match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(log) => Some(log),
        Err(err) => {
            tracing::warn!(error = %err, "the eBPF programs' own log cannot be read: their rare conditions show only as counters");
            None
        }
    }
}

/// Forwards records whenever the ring has some, until `shutdown`.
pub async fn run(log: ProgramLog, shutdown: CancellationToken) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open,
    // unchanged, for as long as the AsyncFd that owns the logger lives.
    let mut log = match unsafe { AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE) } {
        Ok(log) => log,
        Err(err) => {
            tracing::warn!(error = %err, "polling the eBPF programs' own log");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = log.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                // aya-log unwraps its parse of each record: a record it
                // cannot read would panic here. The agent keeps running
                // without the programs' log instead.
                let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guard.get_inner_mut().flush()));
                if flushed.is_err() {
                    tracing::warn!("an eBPF log record could not be read: the programs' own log is off until restart; their counters still count");
                    return;
                }
                guard.clear_ready();
            }
        }
    }
}
