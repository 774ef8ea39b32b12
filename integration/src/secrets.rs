//! The leak check every end-to-end test ends with: [`Secrets`] remembers what the test saw and
//! searches the broker's log and store for it.

use crate::broker_process::BrokerProcess;
use sqlx::Row;

/// Every secret a test saw (minted credentials, revocation tokens, job tokens, operator tokens),
/// checked at the end of the test against everything the broker wrote down: its log (run with
/// `BROKER_LOG=debug`, stderr included, so panic output too) and every table of its store.
///
/// Use: `let mut secrets = Secrets::default();` → `secrets.add(job_token)` for what the test
/// sends, `secrets.add_response(&body)` for each exchange response →
/// `secrets.assert_not_leaked(&broker, db.url()).await` before the broker is dropped.
#[derive(Default)]
pub struct Secrets {
    values: Vec<String>,
}

/// Credential fields the providers mark secret (`Field::Secret`); everything else in a
/// credential (username, access key id, expiry) is public and legitimately logged.
pub const SECRET_FIELDS: &[&str] = &[
    "token",
    "password",
    "database_url",
    "secret_access_key",
    "session_token",
    "private_key",
];

/// Shortest fragment searched for: long enough to be unique to one secret.
const FRAGMENT: usize = 20;

impl Secrets {
    /// Remember one secret (ignored if shorter than the searched fragment).
    pub fn add(&mut self, s: impl Into<String>) {
        let s = s.into();
        if s.len() >= FRAGMENT && !self.values.contains(&s) {
            self.values.push(s);
        }
    }

    /// Remember the revocation token and every secret field of an exchange response.
    pub fn add_response(&mut self, body: &serde_json::Value) {
        if let Some(t) = body["revocation_token"].as_str() {
            self.add(t);
        }
        if let Some(creds) = body["credentials"].as_object() {
            for c in creds.values() {
                for f in SECRET_FIELDS {
                    if let Some(v) = c[*f].as_str() {
                        self.add(v);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every place `haystack` contains a secret or a recognisable fragment of one (its first or
    /// last 20 characters: a JWT's signature, a password's tail), as `"<what>: secret #i"`
    /// (never the secret itself, so a failing test does not leak it either).
    pub fn find_in(&self, what: &str, haystack: &str) -> Vec<String> {
        // One pass over the haystack for every fragment (logs and store dumps run to megabytes).
        // A whole secret contains its tail, so the tails also find whole secrets.
        let mut patterns: Vec<&[u8]> = Vec::new();
        let mut owner = Vec::new();
        for (i, s) in self.values.iter().enumerate() {
            let b = s.as_bytes();
            patterns.push(&b[b.len() - FRAGMENT..]);
            owner.push(i);
            // A JWT's head is the base64 of a common header, and a URL's head is its scheme and
            // (public) user name: only their tails are unique.
            if !s.starts_with("eyJ") && !s.contains("://") {
                patterns.push(&b[..FRAGMENT]);
                owner.push(i);
            }
        }
        let ac = match aho_corasick::AhoCorasick::new(&patterns) {
            Ok(ac) => ac,
            Err(e) => return vec![format!("{what}: cannot search: {e}")],
        };
        let found: std::collections::BTreeSet<usize> = ac
            .find_overlapping_iter(haystack.as_bytes())
            .map(|m| owner[m.pattern().as_usize()])
            .collect();
        found
            .into_iter()
            .map(|i| format!("{what}: secret #{i} ({} chars)", self.values[i].len()))
            .collect()
    }

    /// Assert that no secret reached the broker's log or its store, and that the broker never
    /// panicked. `store_url` is the store the broker used (Postgres: every table of the public
    /// schema is dumped as text; SQLite: the database files are searched byte for byte).
    pub async fn assert_not_leaked(&self, broker: &BrokerProcess, store_url: &str) {
        let hits = self.leaks(broker, store_url).await;
        assert!(hits.is_empty(), "secrets leaked: {hits:?}");
        let log = broker.log();
        assert!(
            !log.contains("panicked at"),
            "the broker panicked; log:\n{log}"
        );
    }

    /// Where secrets leaked (empty: nowhere). See [`Self::assert_not_leaked`].
    pub async fn leaks(&self, broker: &BrokerProcess, store_url: &str) -> Vec<String> {
        let mut hits = self.find_in("broker log", &broker.log());
        match dump_store(store_url).await {
            Ok(dump) => hits.extend(self.find_in("store", &dump)),
            Err(e) => hits.push(format!("store could not be searched: {e:#}")),
        }
        hits
    }
}

/// Everything in a store as one string (see [`Secrets::assert_not_leaked`]).
pub async fn dump_store(store_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    if let Some(path) = store_url.strip_prefix("sqlite:") {
        let path = path.split('?').next().unwrap_or(path);
        let mut out = String::new();
        for suffix in ["", "-wal", "-journal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        anyhow::ensure!(!out.is_empty(), "no SQLite file at {path}");
        return Ok(out);
    }
    let mut conn = sqlx::PgConnection::connect(store_url).await?;
    let tables: Vec<String> = sqlx::query(
        "SELECT quote_ident(table_name) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut conn)
    .await?
    .into_iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    anyhow::ensure!(!tables.is_empty(), "the store has no tables");
    let mut out = String::new();
    for t in tables {
        // quote_ident made `t` safe to splice.
        let rows = sqlx::query(&format!("SELECT x::text FROM {t} x"))
            .fetch_all(&mut conn)
            .await?;
        for r in rows {
            out.push_str(&r.get::<String, _>(0));
            out.push('\n');
        }
    }
    conn.close().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    /// The leak search finds a secret whole, by its tail (a JWT signature, a password's end) or
    /// by its head (a random token's start), and never reports the secret itself.
    #[test]
    fn secrets_are_found_whole_and_by_fragment() {
        let mut s = Secrets::default();
        s.add_response(&serde_json::json!({
            "revocation_token": "brk_rvk_AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH",
            "credentials": {"db": {"username": "brk_user_public", "password": "pw-0123456789abcdefghijKLMNOP"}},
        }));
        s.add("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.signature-part-0123456789");
        s.add("short");
        assert_eq!(
            s.len(),
            3,
            "short values and public fields are not collected"
        );
        assert!(
            s.find_in("log", "user brk_user_public logged in")
                .is_empty()
        );
        let hits = s.find_in("log", "token=brk_rvk_AAAABBBBCCCC…");
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert!(!hits[0].contains("AAAA"), "a hit never quotes the secret");
        assert_eq!(s.find_in("log", "…6789abcdefghijKLMNOP").len(), 1);
        assert_eq!(s.find_in("log", "sig=signature-part-0123456789").len(), 1);
        // A JWT's head is a common header, not evidence of a leak.
        assert!(s.find_in("log", "eyJhbGciOiJSUzI1NiJ9.eyJ").is_empty());
    }
}
