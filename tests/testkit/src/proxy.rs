//! A TCP proxy on loopback in front of the broker, so a test can cut the daemon's broker
//! connections at will (as a broker restart or a network fault would) without touching the
//! broker or other tests' connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Forwards every connection to `upstream` until dropped; [`Proxy::cut`] drops the live ones.
pub struct Proxy {
    addr: SocketAddr,
    /// One task per proxied connection; aborting it drops both sockets.
    links: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let links = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut links = accepted.lock().unwrap_or_else(|p| p.into_inner());
                links.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            links,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection made so far, both ways, without a goodbye.
    pub fn cut(&self) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
