//! A tenant HTTP server for tests and the demo. Prints one JSON line with
//! its address on stdout, then serves until killed.
//!
//! usage: tenant [LISTEN_ADDR] [BODY_BYTES] [DELAY_MS] [SECOND_LISTEN_ADDR|-] [WORK_US]
//!
//! With a second address it serves the same on two ports (as an inference
//! server with a separate metrics or admin port). WORK_US is busy CPU time
//! per request (the overhead benchmark's stand-in for a real front end).
use std::time::Duration;

use integration::http::{serve, ServerBehaviour};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = args.first().map_or("127.0.0.1:0", String::as_str);
    let body_bytes = args.get(1).map_or(Ok(256), |s| s.parse()).map_err(|e| anyhow::anyhow!("BODY_BYTES: {e}"))?;
    let delay_ms: u64 = args.get(2).map_or(Ok(0), |s| s.parse()).map_err(|e| anyhow::anyhow!("DELAY_MS: {e}"))?;
    let work_us: u64 = args.get(4).map_or(Ok(0), |s| s.parse()).map_err(|e| anyhow::anyhow!("WORK_US: {e}"))?;
    let behaviour =
        ServerBehaviour { body_bytes, delay: Duration::from_millis(delay_ms), work: Duration::from_micros(work_us) };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let Some(second) = args.get(3).filter(|second| second.as_str() != "-") else {
        println!("{{\"listening\":\"{}\"}}", listener.local_addr()?);
        serve(listener, behaviour).await?;
        return Ok(());
    };
    let second = tokio::net::TcpListener::bind(second.as_str()).await?;
    println!("{{\"listening\":\"{}\",\"second\":\"{}\"}}", listener.local_addr()?, second.local_addr()?);
    tokio::try_join!(serve(listener, behaviour), serve(second, behaviour))?;
    Ok(())
}
