//! [`FaultProxy`]: a TCP proxy a test cuts, stalls and restores in front of a real server.

/// What a [`FaultProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Up,
    /// Close every open connection and every new one at once (a crashed or unreachable peer).
    Down,
    /// Accept and hold connections, forwarding nothing until the mode changes (a hung peer,
    /// a full network buffer, a lock wait).
    Stall,
}

/// A TCP proxy on 127.0.0.1 in front of a real server (Postgres, an issuer), which a test can
/// cut or stall and restore without restarting anything on either side.
pub struct FaultProxy {
    pub port: u16,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free port and forward to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, rx) = tokio::sync::watch::channel(ProxyMode::Up);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rx = rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if *rx.borrow() == ProxyMode::Down {
                        return; // dropping `client` closes it
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either direction ending (or the proxy going down) ends both.
                    tokio::select! {
                        _ = pump(cr, sw, rx.clone()) => {}
                        _ = pump(sr, cw, rx) => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            mode,
            accepted,
            task,
        })
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `url` with its host and port replaced by this proxy's.
    pub fn url_via(&self, url: &str) -> anyhow::Result<String> {
        let mut u = url::Url::parse(url)?;
        u.set_host(Some("127.0.0.1"))?;
        u.set_port(Some(self.port))
            .map_err(|()| anyhow::anyhow!("cannot set a port on {}", u.scheme()))?;
        Ok(u.to_string())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set(ProxyMode::Down);
        self.task.abort();
    }
}

/// Copy `from` → `to` while the mode allows: `Stall` holds the bytes read so far, `Down` ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait while stalled; stop when down.
        loop {
            let m = *mode.borrow_and_update();
            match m {
                ProxyMode::Up => break,
                ProxyMode::Down => return,
                ProxyMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read before a stall are held until the stall ends (or dropped if it goes down).
        loop {
            let m = *mode.borrow_and_update();
            match m {
                ProxyMode::Up => break,
                ProxyMode::Down => return,
                ProxyMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
