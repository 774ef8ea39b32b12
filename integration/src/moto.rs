//! moto in server mode: the AWS STS and IAM endpoint of the AWS end-to-end tests. Installed by
//! `scripts/test` into `target/test-venv` (or named by `BROKER_TEST_MOTO_SERVER`).
// Test harness: a peer that misbehaves fails the calling test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use crate::wait::free_port;
use broker::providers::aws_sts::deny::{DENY_POLICY_NAME, percent_decode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// moto's account id.
pub const ACCOUNT: &str = "123456789012";
/// moto accepts any static credentials; these are the ones the tests use.
pub const KEY_ID: &str = "testing";
pub const SECRET: &str = "testing";

fn moto_bin() -> PathBuf {
    std::env::var("BROKER_TEST_MOTO_SERVER")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::issuer::repo_root().join("target/test-venv/bin/moto_server"))
}

/// The environment of a broker whose AWS targets are a [`Moto`]: the test credentials, and no
/// instance metadata, config or credentials file of the machine.
pub fn broker_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A moto server on 127.0.0.1 with a free port; stopped by PID on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    /// `None` (after saying so) when moto is not installed: the caller skips its AWS part.
    pub async fn start() -> Option<Moto> {
        let bin = moto_bin();
        if !bin.exists() {
            println!(
                "SKIPPED (AWS): moto is not installed at {} (scripts/test installs it; no network?)",
                bin.display()
            );
            return None;
        }
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = crate::http::client();
        for _ in 0..300 {
            if http
                .get(format!("{}/moto-api/", m.url))
                .send()
                .await
                .is_ok()
            {
                return Some(m);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not answer on {}", m.url);
    }

    /// An SDK config for this server with the given credentials.
    pub async fn sdk(&self, key: &str, secret: &str, token: Option<&str>) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                key,
                secret,
                token.map(str::to_owned),
                None,
                "test",
            ))
            .load()
            .await
    }

    pub async fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.sdk(KEY_ID, SECRET, None).await)
    }

    /// Create a role (moto would assume a missing one anyway; real AWS would not).
    pub async fn create_role(&self, name: &str) -> String {
        let trust = json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]
            }]
        });
        let out = self
            .iam()
            .await
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .expect("create role");
        out.role().map(|r| r.arn().to_owned()).expect("role arn")
    }

    /// The broker's deny policy on `role`, as JSON.
    pub async fn deny_policy(&self, role: &str) -> Option<Value> {
        let out = self
            .iam()
            .await
            .get_role_policy()
            .role_name(role)
            .policy_name(DENY_POLICY_NAME)
            .send()
            .await
            .ok()?;
        let raw = out.policy_document();
        let text = if raw.starts_with('{') {
            raw.to_owned()
        } else {
            percent_decode(raw).expect("decodable")
        };
        Some(serde_json::from_str(&text).expect("policy is JSON"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
