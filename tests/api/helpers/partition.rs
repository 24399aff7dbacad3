//! A TCP proxy in front of a server that a test can cut and heal: a network partition between
//! one app instance and Redis, while the server itself and the other instances stay fine. A real
//! server cannot be unreachable for one client only, so this is the one fake link in the suite.
//! Cut, it forwards nothing (bytes wait, as on a link that drops packets); healed, it resumes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub struct Partition {
    pub port: u16,
    state: Arc<LinkState>,
}

struct LinkState {
    cut: AtomicBool,
    healed: Notify,
}

impl LinkState {
    async fn wait_until_up(&self) {
        loop {
            let healed = self.healed.notified();
            if !self.cut.load(Ordering::Acquire) {
                return;
            }
            healed.await;
        }
    }
}

impl Partition {
    /// A proxy on a free loopback port in front of `upstream` (`host:port`).
    pub async fn new(upstream: String) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(LinkState {
            cut: AtomicBool::new(false),
            healed: Notify::new(),
        });
        let accepting = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (state, upstream) = (accepting.clone(), upstream.clone());
                tokio::spawn(async move {
                    state.wait_until_up().await;
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        forward(client_read, server_write, state.clone()),
                        forward(server_read, client_write, state)
                    );
                });
            }
        });
        Partition { port, state }
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
    }

    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::Release);
        self.state.healed.notify_waiters();
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<LinkState>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else { return };
        if read == 0 {
            return;
        }
        state.wait_until_up().await;
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
