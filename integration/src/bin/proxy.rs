//! A sidecar stand-in for tests: accepts on LISTEN_ADDR and relays each
//! connection to TARGET_ADDR (as a service-mesh proxy relays to the app
//! over loopback). Prints one JSON line with its address, then serves.
//!
//! usage: proxy LISTEN_ADDR TARGET_ADDR
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(target)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: proxy LISTEN_ADDR TARGET_ADDR");
    };
    let target: std::net::SocketAddr = target.parse()?;
    let listener = TcpListener::bind(listen.as_str()).await?;
    println!("{{\"listening\":\"{}\"}}", listener.local_addr()?);
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
