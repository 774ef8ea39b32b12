//! The one builder of outgoing HTTP clients: JWKS and discovery fetches, the job-side client
//! (`broker exchange`/`revoke`), the GitHub runner's token endpoint, and the operator CLI
//! (`broker admin`, `broker audit query`, `broker policy diff --audit-url`).
//!
//! Every client gets the same base: rustls with the system's trust roots (Mozilla's, compiled in,
//! where the system has none), the proxy taken
//! from the environment (`HTTPS_PROXY`, `NO_PROXY`, as reqwest reads them), a user agent naming
//! the broker and its version, and an overall timeout. What differs is chosen by name here, not
//! by a builder call somewhere else:
//! - redirects: none, unless the caller opts in ([`Outbound::follow_redirects`]). The JWKS
//!   fetcher must never follow one (only configured issuers are contacted), and an operator
//!   token is not sent on to another address;
//! - a connect timeout shorter than the whole request, where a caller wants one.

use std::time::Duration;

/// The user agent of the broker and of its operator commands.
pub const USER_AGENT: &str = concat!("broker/", env!("CARGO_PKG_VERSION"));
/// The user agent of the job-side client, so the broker's audit tells the two apart.
pub const JOB_CLIENT_USER_AGENT: &str = concat!("broker-client/", env!("CARGO_PKG_VERSION"));

/// The TLS backend could not be set up (no secret can be in it: nothing is sent yet). The
/// message includes reqwest's, so it is not repeated as a source.
#[derive(Debug, thiserror::Error)]
#[error("cannot build an HTTP client: {0}")]
pub struct BuildError(reqwest::Error);

impl From<reqwest::Error> for BuildError {
    fn from(e: reqwest::Error) -> Self {
        Self(e)
    }
}

/// How one outgoing client behaves; [`Outbound::build`] makes it.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Outbound {
    /// `None`: a long-lived answer (a stream), bounded by `read_timeout` instead.
    timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    follow_redirects: bool,
    user_agent: &'static str,
}

impl Outbound {
    /// A client whose requests give up after `timeout` in all, follow no redirect and send
    /// [`USER_AGENT`].
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            read_timeout: None,
            connect_timeout: None,
            follow_redirects: false,
            user_agent: USER_AGENT,
        }
    }

    /// For answers that last (a followed stream): no limit on the whole request, but give up when
    /// nothing arrives for `idle`.
    pub fn streaming(mut self, idle: Duration) -> Self {
        self.timeout = None;
        self.read_timeout = Some(idle);
        self
    }

    /// Give up connecting after `timeout`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Follow up to ten redirects (reqwest's default). Authorization headers are dropped when a
    /// redirect leaves the host.
    pub fn follow_redirects(mut self) -> Self {
        self.follow_redirects = true;
        self
    }

    pub fn user_agent(mut self, user_agent: &'static str) -> Self {
        self.user_agent = user_agent;
        self
    }

    pub fn build(self) -> Result<reqwest::Client, BuildError> {
        match self.builder().build() {
            Ok(c) => Ok(c),
            // The system's trust roots could not be loaded: a job image with no CA bundle (busybox,
            // scratch, distroless static), where the static client must still work. Mozilla's
            // roots, compiled in, take their place; an image that has a bundle never gets here.
            Err(_) => Ok(self.builder().tls_certs_only(bundled_roots()).build()?),
        }
    }

    fn builder(&self) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder().user_agent(self.user_agent);
        if let Some(t) = self.timeout {
            b = b.timeout(t);
        }
        if let Some(t) = self.read_timeout {
            b = b.read_timeout(t);
        }
        if !self.follow_redirects {
            b = b.redirect(reqwest::redirect::Policy::none());
        }
        if let Some(t) = self.connect_timeout {
            b = b.connect_timeout(t);
        }
        b
    }
}

/// Mozilla's root certificates as shipped with the binary (the `webpki-root-certs` crate).
fn bundled_roots() -> Vec<reqwest::Certificate> {
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_roots_parse() {
        // The fallback for a system without a CA bundle is only useful if it trusts something.
        assert!(bundled_roots().len() > 100);
    }

    #[tokio::test]
    async fn redirects_are_not_followed_unless_asked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer = if req.starts_with("GET /moved ") {
                    "HTTP/1.1 302 Found\r\nlocation: /here\r\ncontent-length: 0\r\n\r\n".to_owned()
                } else {
                    let ua = req
                        .lines()
                        .find_map(|l| l.strip_prefix("user-agent: "))
                        .unwrap_or("")
                        .to_owned();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{ua}",
                        ua.len()
                    )
                };
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/moved");
        let plain = Outbound::new(Duration::from_secs(5)).build().unwrap();
        assert_eq!(plain.get(&url).send().await.unwrap().status(), 302);
        let follows = Outbound::new(Duration::from_secs(5))
            .follow_redirects()
            .user_agent(JOB_CLIENT_USER_AGENT)
            .build()
            .unwrap();
        let resp = follows.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), JOB_CLIENT_USER_AGENT);
    }
}
