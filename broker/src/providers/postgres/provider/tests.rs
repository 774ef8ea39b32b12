//! Tests of `providers::postgres::provider`.

use super::*;
use time::OffsetDateTime;

#[test]
fn create_role_quotes_everything_and_is_redacted() {
    let v = Sensitive::new("SCRAM-SHA-256$4096:c2FsdA==$a:b");
    let sql = create_role_sql(
        "brk_x_1",
        &v,
        "2030-01-01T00:00:00Z",
        Some(2),
        &["app read", "we\"ird"],
    )
    .unwrap();
    assert_eq!(
        sql.expose(),
        "CREATE ROLE \"brk_x_1\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS INHERIT CONNECTION LIMIT 2 PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b' \
             VALID UNTIL '2030-01-01T00:00:00Z' IN ROLE \"app read\", \"we\"\"ird\""
    );
    assert!(!format!("{sql:?}").contains("SCRAM"));
}

#[test]
fn database_url_encodes_parts() {
    let u = database_url(
        "brk_a",
        &Sensitive::new("Pw0"),
        "::1",
        5433,
        "my db/x",
        SslMode::Require,
    );
    assert_eq!(
        u.expose(),
        "postgresql://brk_a:Pw0@[::1]:5433/my%20db%2Fx?sslmode=require"
    );
}

/// A target with the given admin URL, one connection and a short connect timeout.
fn target(admin_url: &str) -> PostgresTargetConfig {
    PostgresTargetConfig {
        admin_url: crate::secret::SecretRef::inline(admin_url),
        host: "db".into(),
        port: 5432,
        sslmode: SslMode::Disable,
        pool_size: 1,
        connect_timeout: time::Duration::seconds(1),
        role_prefix: "brk_".into(),
        scram_iterations: 1,
    }
}

#[tokio::test]
async fn debug_hides_the_admin_password_and_bad_urls_are_not_echoed() {
    let mut targets = BTreeMap::new();
    targets.insert(
        "main".to_owned(),
        target("postgres://admin:hunter2@127.0.0.1:1/postgres"),
    );
    let p = PostgresProvider::new(&targets).unwrap();
    assert!(!format!("{p:?}").contains("hunter2"));
    targets.insert(
        "bad".to_owned(),
        target("postgres://u:hunter2@x:notaport/db"),
    );
    let e = PostgresProvider::new(&targets).unwrap_err().to_string();
    assert!(e.contains("targets.postgres.bad.admin_url"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

#[tokio::test]
async fn unreachable_target_is_target_unavailable_and_undo_needs_no_server() {
    let mut targets = BTreeMap::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    targets.insert(
        "main".to_owned(),
        target(&format!("postgres://admin:pw@127.0.0.1:{port}/postgres")),
    );
    let p = PostgresProvider::new(&targets).unwrap();
    let def = CredentialDef {
        name: "db".into(),
        description: None,
        max_ttl: time::Duration::minutes(5),
        spec: CredentialSpec::Postgres(
            serde_saphyr::from_str("target: main\ndatabase: app\nowner: app_owner\n").unwrap(),
        ),
    };
    let gid = Uuid::now_v7();
    let rid = p.resource_id(gid, &def);
    assert!(rid.starts_with("brk_db_"));
    let claims = crate::oidc::VerifiedClaims {
        issuer: "github".into(),
        platform: crate::oidc::Platform::Github,
        iss: "https://x".into(),
        sub: "s".into(),
        jti: None,
        exp: OffsetDateTime::UNIX_EPOCH,
        iat: None,
        single_use: true,
        replay_until: OffsetDateTime::UNIX_EPOCH,
        claims: serde_json::Map::new(),
    };
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let err = p
        .mint(MintRequest {
            grant_id: gid,
            credential: &def,
            resource_id: &rid,
            claims: &claims,
            now,
            expires_at: now + time::Duration::minutes(1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "target_unavailable");
    let ic = IssuedCredential {
        name: "db".into(),
        kind: CredentialKind::Postgres,
        resource_id: rid.clone(),
        details: p.intent_details(&def),
    };
    // The undo right after knows nothing was created…
    p.revoke(&ic).await.unwrap();
    // …but any later revoke must reach the server.
    assert_eq!(
        p.revoke(&ic).await.unwrap_err().reason_code(),
        "target_unavailable"
    );
    assert!(!p.health().await.ok);
}
