//! Which job a (verified) delivery says has ended, and what identifies its grants.
//!
//! What is matched, precisely (every field must be equal; values are decimal strings):
//!
//! | grant (from the job token)            | GitHub `workflow_job`, action `completed`  |
//! |---------------------------------------|--------------------------------------------|
//! | issuer is one of the endpoint's       | (the endpoint's GitHub issuers)            |
//! | `repository_id` claim                 | `repository.id`                            |
//! | `run_id` claim                        | `workflow_job.run_id`                      |
//! | `run_attempt` claim                   | `workflow_job.run_attempt`                 |
//! | `check_run_id` claim                  | the check-run id at the end of `workflow_job.check_run_url` (else `workflow_job.id`; GitHub gives a job the id of its check run) |
//!
//! | grant (from the job token)            | GitLab job event, `object_kind: build`, `build_status` success / failed / canceled |
//! |---------------------------------------|--------------------------------------------|
//! | issuer is one of the endpoint's       | (the endpoint's GitLab issuers)            |
//! | `project_id` claim                    | `project_id`                               |
//! | `job_id` claim                        | `build_id`                                 |
//!
//! Why this is safe: ids are immutable and assigned by the CI platform (names are not used, so
//! a renamed or look-alike repository cannot match); the job id alone singles out one job of
//! one run (GitHub check-run ids and GitLab job ids are unique per instance), and the repository
//! id, run id and attempt narrow it further, so a re-run (a new attempt) or another job of the
//! same run keeps its credentials; grants whose token lacked the job id claim never match and
//! end at their TTL. The delivery itself is trusted only after its signature verified.

use serde_json::Value;

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEvent {
    /// Nothing to do (another event type or action, a job still running); the reason is for
    /// the response.
    Ignored(&'static str),
    /// A job finished: revoke its grants.
    JobEnd(JobEnd),
}

/// A finished job's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    pub repository_id: String,
    pub job_id: String,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    /// For the audit log only (never matched on).
    pub repository: Option<String>,
    pub job_name: Option<String>,
    pub status: Option<String>,
}

/// A positive integer id, as GitHub and GitLab send them (numbers; tolerate numeric strings).
fn id(v: Option<&Value>) -> Option<String> {
    let n = match v? {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) if !s.is_empty() && s.len() <= 20 => s.parse::<u64>().ok()?,
        _ => return None,
    };
    (n > 0).then(|| n.to_string())
}

/// A short display string for the audit log.
fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .map(|s| s.chars().filter(|c| !c.is_control()).take(200).collect())
}

/// Why a verified delivery cannot be read; the message goes back in the `400` response, so it
/// names a key and what was expected, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The body is not JSON (the parser's message, cut to 200 characters).
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// A field the match needs is missing or malformed: `<key>: <what was expected>`.
    #[error("{0}")]
    BadField(&'static str),
}
use EventError::BadField;

fn parse(body: &[u8]) -> Result<Value, EventError> {
    serde_json::from_slice(body)
        .map_err(|e| EventError::InvalidJson(e.to_string().chars().take(200).collect()))
}

/// A GitHub delivery with event type `event`.
pub fn github(event: Option<&str>, body: &[u8]) -> Result<HookEvent, EventError> {
    match event {
        Some("workflow_job") => {}
        Some("ping") => return Ok(HookEvent::Ignored("ping")),
        _ => return Ok(HookEvent::Ignored("not a workflow_job event")),
    }
    let v = parse(body)?;
    if v.get("action").and_then(Value::as_str) != Some("completed") {
        return Ok(HookEvent::Ignored("job not completed"));
    }
    let job = v
        .get("workflow_job")
        .ok_or(BadField("workflow_job: missing"))?;
    let check_run = job
        .get("check_run_url")
        .and_then(Value::as_str)
        .and_then(|u| u.rsplit('/').next())
        .map(|tail| Value::String(tail.to_owned()));
    let job_id = id(check_run.as_ref())
        .or_else(|| id(job.get("id")))
        .ok_or(BadField("workflow_job.id: expected a positive integer"))?;
    Ok(HookEvent::JobEnd(JobEnd {
        repository_id: id(v.get("repository").and_then(|r| r.get("id")))
            .ok_or(BadField("repository.id: expected a positive integer"))?,
        job_id,
        run_id: Some(
            id(job.get("run_id"))
                .ok_or(BadField("workflow_job.run_id: expected a positive integer"))?,
        ),
        run_attempt: Some(id(job.get("run_attempt")).ok_or(BadField(
            "workflow_job.run_attempt: expected a positive integer",
        ))?),
        repository: text(v.get("repository").and_then(|r| r.get("full_name"))),
        job_name: text(job.get("name")),
        status: text(job.get("conclusion")),
    }))
}

/// A GitLab delivery with event type `event` (`X-Gitlab-Event`).
pub fn gitlab(event: Option<&str>, body: &[u8]) -> Result<HookEvent, EventError> {
    if event != Some("Job Hook") {
        return Ok(HookEvent::Ignored("not a job event"));
    }
    let v = parse(body)?;
    if v.get("object_kind").and_then(Value::as_str) != Some("build") {
        return Ok(HookEvent::Ignored("not a job event"));
    }
    let status = v.get("build_status").and_then(Value::as_str);
    if !matches!(status, Some("success" | "failed" | "canceled")) {
        return Ok(HookEvent::Ignored("job not finished"));
    }
    Ok(HookEvent::JobEnd(JobEnd {
        repository_id: id(v.get("project_id"))
            .ok_or(BadField("project_id: expected a positive integer"))?,
        job_id: id(v.get("build_id")).ok_or(BadField("build_id: expected a positive integer"))?,
        run_id: None,
        run_attempt: None,
        repository: text(v.get("project").and_then(|p| p.get("path_with_namespace"))),
        job_name: text(v.get("build_name")),
        status: text(v.get("build_status")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workflow_job(action: &str) -> Value {
        json!({
            "action": action,
            "workflow_job": {
                "id": 29679449, "run_id": 5, "run_attempt": 2, "name": "deploy",
                "check_run_url": "https://api.example/repos/acme/api/check-runs/29679449",
                "conclusion": "success"
            },
            "repository": {"id": 1000001, "full_name": "acme/api"}
        })
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn github_completed_job_is_identified_by_ids() {
        let e = github(Some("workflow_job"), &bytes(&workflow_job("completed"))).unwrap();
        assert_eq!(
            e,
            HookEvent::JobEnd(JobEnd {
                repository_id: "1000001".into(),
                job_id: "29679449".into(),
                run_id: Some("5".into()),
                run_attempt: Some("2".into()),
                repository: Some("acme/api".into()),
                job_name: Some("deploy".into()),
                status: Some("success".into()),
            })
        );
        // The check-run id wins over the job id when both are given.
        let mut v = workflow_job("completed");
        v["workflow_job"]["check_run_url"] = json!("https://x/check-runs/77");
        let HookEvent::JobEnd(j) = github(Some("workflow_job"), &bytes(&v)).unwrap() else {
            panic!("not a job end")
        };
        assert_eq!(j.job_id, "77");
    }

    #[test]
    fn github_other_events_and_actions_are_ignored() {
        for a in ["queued", "in_progress", "waiting"] {
            assert!(matches!(
                github(Some("workflow_job"), &bytes(&workflow_job(a))),
                Ok(HookEvent::Ignored(_))
            ));
        }
        let b = bytes(&workflow_job("completed"));
        for ev in [None, Some("push"), Some("workflow_run"), Some("ping")] {
            assert!(
                matches!(github(ev, &b), Ok(HookEvent::Ignored(_))),
                "{ev:?}"
            );
        }
    }

    #[test]
    fn github_malformed_completed_jobs_are_errors() {
        assert!(github(Some("workflow_job"), b"{not json").is_err());
        for (path, bad) in [
            ("repository", json!({"id": "acme"})),
            ("run_id", json!(0)),
            ("run_attempt", json!(-1)),
            ("run_id", Value::Null),
        ] {
            let mut v = workflow_job("completed");
            if path == "repository" {
                v["repository"] = bad;
            } else {
                v["workflow_job"][path] = bad;
            }
            let err = github(Some("workflow_job"), &bytes(&v))
                .unwrap_err()
                .to_string();
            assert!(err.contains(path), "{err}");
        }
    }

    #[test]
    fn gitlab_finished_jobs_only() {
        let ev = |status: &str| {
            json!({"object_kind": "build", "build_id": 4242, "build_status": status,
                   "build_name": "deploy", "project_id": 2000001, "pipeline_id": 9,
                   "project": {"path_with_namespace": "acme/api"}})
        };
        for s in ["success", "failed", "canceled"] {
            let HookEvent::JobEnd(j) = gitlab(Some("Job Hook"), &bytes(&ev(s))).unwrap() else {
                panic!("{s} should end the job")
            };
            assert_eq!(
                (j.repository_id.as_str(), j.job_id.as_str(), j.run_id),
                ("2000001", "4242", None)
            );
        }
        for s in ["created", "pending", "running", "manual"] {
            assert!(matches!(
                gitlab(Some("Job Hook"), &bytes(&ev(s))),
                Ok(HookEvent::Ignored(_))
            ));
        }
        assert!(matches!(
            gitlab(Some("Pipeline Hook"), &bytes(&ev("success"))),
            Ok(HookEvent::Ignored(_))
        ));
        let mut v = ev("failed");
        v["build_id"] = json!("x");
        assert!(
            gitlab(Some("Job Hook"), &bytes(&v))
                .unwrap_err()
                .to_string()
                .contains("build_id")
        );
    }
}
