//! Traces: the real `broker` binary exports OTLP/HTTP (protobuf) to a collector started here
//! (an axum server receiving `POST /v1/traces`); the request's span arrives carrying the
//! request id the client sent, the service name, and nothing secret.

use axum::body::Bytes;
use axum::routing::post;
use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::{BrokerProcess, BrokerSetup, acme_token};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Received = Arc<Mutex<Vec<Bytes>>>;

/// A minimal OTLP/HTTP trace collector: keeps every request body.
async fn collector() -> (String, Received) {
    let got: Received = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

fn string(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string(&kv.value))
}

#[tokio::test]
async fn request_spans_reach_the_collector_with_the_request_id() {
    let (endpoint, received) = collector().await;
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::sqlite().await;
    let broker = BrokerProcess::start(
        &BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url())
            .extra(format!(
                "telemetry:\n  otlp_endpoint: {endpoint}\n  service_name: broker-otel-test\n"
            ))
            // Export promptly instead of the SDK's default 5 s batch delay.
            .env(vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())]),
    )
    .await
    .expect("broker starts");

    let token = acme_token(&issuer.url());
    let request_id = format!("otel-{}", uuid::Uuid::new_v4());
    let resp = integration::http::client()
        .post(format!("{}/v1/exchange", broker.url))
        .bearer_auth(&token)
        .header("x-request-id", &request_id)
        .json(&serde_json::json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The broker's own id is authoritative and sent back; the client's is kept beside it.
    let own_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(
        own_id, request_id,
        "a client id never replaces the broker's"
    );
    assert!(uuid::Uuid::parse_str(&own_id).is_ok(), "{own_id}");
    let body: serde_json::Value = resp.json().await.unwrap();

    // Wait (bounded) for the batch exporter to deliver the span.
    let started = Instant::now();
    let span = loop {
        let bodies = received.lock().unwrap().clone();
        let found = bodies.iter().find_map(|b| {
            let req = ExportTraceServiceRequest::decode(b.as_ref()).expect("valid OTLP protobuf");
            req.resource_spans.into_iter().find_map(|rs| {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| attr(&r.attributes, "service.name").map(str::to_owned));
                rs.scope_spans
                    .into_iter()
                    .flat_map(|ss| ss.spans)
                    .find(|s| attr(&s.attributes, "client_request_id") == Some(request_id.as_str()))
                    .map(|s| (service, s))
            })
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no span with request_id {request_id} after 30 s ({} exports); log:\n{}",
            received.lock().unwrap().len(),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (service, span) = span;
    assert_eq!(service.as_deref(), Some("broker-otel-test"));
    assert_eq!(span.name, "request");
    assert_eq!(attr(&span.attributes, "request_id"), Some(own_id.as_str()));
    assert_eq!(attr(&span.attributes, "path"), Some("/v1/exchange"));
    assert_eq!(attr(&span.attributes, "method"), Some("POST"));
    let status = span.attributes.iter().find(|kv| kv.key == "status");
    assert!(
        matches!(
            status.and_then(|kv| kv.value.as_ref()?.value.as_ref()),
            Some(any_value::Value::IntValue(200))
        ) || attr(&span.attributes, "status") == Some("200"),
        "{status:?}"
    );
    assert_eq!(
        span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );

    // Nothing secret left the process in a span: not the job token, not what was minted.
    let all: Vec<u8> = received.lock().unwrap().iter().flatten().copied().collect();
    let text = String::from_utf8_lossy(&all);
    let minted = body["credentials"]["deploy-api"]["token"].as_str().unwrap();
    let revocation = body["revocation_token"].as_str().unwrap();
    for secret in [token.as_str(), minted, revocation] {
        assert!(!text.contains(secret), "a secret was exported in a span");
    }
    drop(broker);
    issuer.shutdown().await;
    gitlab.shutdown().await;
    db.cleanup().await;
}

/// `metrics.token`: scrapes without it (or with another token, or a job token) get 401; with
/// it, the OpenMetrics text, which counts the refused exchange by its reason and holds no
/// secret.
#[tokio::test]
async fn metrics_require_the_configured_token() {
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::sqlite().await;
    let scrape_token = format!("scrape-{}", uuid::Uuid::new_v4());
    let broker = BrokerProcess::start(
        &BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url()).extra(format!(
            "metrics:\n  token: {{value: \"{scrape_token}\"}}\n  danger_public_diagnostics: true\n"
        )),
    )
    .await
    .expect("broker starts");
    let http = integration::http::client();
    let url = format!("{}/metrics", broker.url);
    let job_token = acme_token(&issuer.url());
    // One refused exchange (no bearer token) to be counted.
    let r = http
        .post(format!("{}/v1/exchange", broker.url))
        .json(&serde_json::json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for bad in [None, Some("wrong"), Some(job_token.as_str())] {
        let mut req = http.get(&url);
        if let Some(t) = bad {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "token {bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    let r = http
        .get(&url)
        .bearer_auth(&scrape_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains(
            r#"broker_exchanges_total{outcome="deny",reason="missing_token",kind="none"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("broker_policy_bundle{digest=\""), "{text}");
    assert!(!text.contains(&scrape_token) && !text.contains(&job_token));
    assert!(!broker.log().contains(&scrape_token), "scrape token logged");
    drop(broker);
    issuer.shutdown().await;
    gitlab.shutdown().await;
    db.cleanup().await;
}

/// With `admin_listen` set, `/metrics` is served there with the operator API and answers 404 on
/// the public listener.
#[tokio::test]
async fn metrics_move_to_the_operator_listener() {
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::sqlite().await;
    let admin_port = integration::free_port();
    let broker = BrokerProcess::start(
        &BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url())
            .extra(format!("admin_listen: 127.0.0.1:{admin_port}\n")),
    )
    .await
    .expect("broker starts");
    let http = integration::http::client();
    let public = http
        .get(format!("{}/metrics", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let admin = format!("http://127.0.0.1:{admin_port}/metrics");
    let mut text = None;
    for _ in 0..100 {
        if let Ok(r) = http.get(&admin).send().await {
            assert_eq!(r.status(), 200);
            text = Some(r.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = text.expect("operator listener answers");
    assert!(text.contains("broker_policy_bundle{digest="), "{text}");
    drop(broker);
    issuer.shutdown().await;
    gitlab.shutdown().await;
    db.cleanup().await;
}
