//! Tests of `policy::load`.

use super::*;

const GOOD: &str = r#"
credentials:
  - name: deploy-api
    max_ttl: 15m
    api_token:
      audience: https://deploy.acme.example
      scopes: ["deploy:${repository}"]
rules:
  - name: main
    issuer: github
    credentials: [deploy-api]
    when: claims.ref == "refs/heads/main"
"#;

fn load(files: &[(&str, &str)]) -> Result<Bundle, LoadErrors> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect();
    Bundle::load_files(&files, &LoadOptions::default())
}

fn errors(files: &[(&str, &str)]) -> Vec<(String, u64, &'static str)> {
    load(files)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| (e.file.clone(), e.line, e.kind.reason_code()))
        .collect()
}

#[test]
fn loads_a_good_file() {
    let b = load(&[("a.yaml", GOOD)]).unwrap();
    let c = b.credential("deploy-api").unwrap();
    assert_eq!(c.max_ttl, Duration::minutes(15));
    assert!(matches!(c.spec, CredentialSpec::ApiToken(_)));
    assert_eq!(b.rules().len(), 1);
    assert_eq!(
        (b.rules()[0].file.as_str(), b.rules()[0].line),
        ("a.yaml", 9)
    );
    assert_eq!(b.rules()[0].when(), r#"claims.ref == "refs/heads/main""#);
    // Empty and comment-only files are fine.
    assert!(load(&[("a.yaml", GOOD), ("b.yml", "# nothing yet\n")]).is_ok());
}

#[test]
fn syntax_and_unknown_keys_are_located() {
    let e = errors(&[
        ("a.yaml", "rules: [\n"),
        ("b.yaml", "rules:\n  - name: x\n    bogus: 1\n"),
    ]);
    assert_eq!(
        e,
        vec![
            ("a.yaml".into(), 1, "yaml_invalid"),
            ("b.yaml".into(), 3, "yaml_invalid")
        ]
    );
    let err = load(&[("b.yaml", "rules:\n  - name: x\n    bogus: 1\n")]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("b.yaml:3: unknown field `bogus`"),
        "{text}"
    );
    assert!(!text.contains("column"), "{text}");
}

#[test]
fn every_semantic_problem_is_collected_with_its_line() {
    let bad = r#"credentials:
  - name: Bad Name
    max_ttl: 15m
    api_token: { audience: a }
  - name: no-kind
    max_ttl: soon
  - name: tmpl
    max_ttl: 1m
    api_token: { audience: a, scopes: ["${a b}"] }
"#;
    let e = errors(&[("c.yaml", bad)]);
    // The template error is a deserialisation error and stops that file.
    assert_eq!(e, vec![("c.yaml".into(), 9, "bad_template")]);
    let bad = r#"credentials:
  - name: Bad Name
    max_ttl: 15m
    api_token: { audience: a }
  - name: no-kind
    max_ttl: soon
  - name: ok
    max_ttl: 1m
    api_token: { audience: a }
rules:
  - name: r1
    issuer: gitlab
    credentials: [ok, missing]
    max_ttl: 0s
    when: claims.a ==
  - name: r1
    issuer: github
    credentials: ["*"]
    when: 'claims.l.map(x, claims.l.map(y, y)).size() > 0'
  - name: r3
    issuer: github
    credentials: []
    when: 'claims.ref.matches(claims.p)'
  - name: r4
    issuer: github
    credentials: ["ok"]
    when: 'claims.ref.matches("(")'
tests:
  - name: t
    issuer: custom
    claims: {}
    expect: { allow: [nope] }
  - name: t
    issuer: github
    claims: {}
    expect: { deny: [ok] }
"#;
    let opts = LoadOptions {
        known_issuers: Some(["github".to_owned()].into()),
    };
    let err = Bundle::load_files(&[("d.yaml".into(), bad.into())], &opts).unwrap_err();
    let got: Vec<(u64, &str)> = err.iter().map(|e| (e.line, e.kind.reason_code())).collect();
    assert_eq!(
        got,
        vec![
            (2, "bad_name"),
            (6, "bad_duration"),
            (5, "credential_kind"),
            (12, "unknown_issuer"),
            (14, "bad_duration"),
            (15, "expression_syntax"),
            (16, "duplicate_name"),
            (18, "wildcard_allow"),
            (19, "nested_comprehension"),
            (20, "no_credentials"),
            (23, "non_literal_pattern"),
            (27, "bad_pattern"),
            (30, "unknown_issuer"),
            (29, "test_platform"),
            (33, "duplicate_name"),
            (13, "unknown_credential"),
            (32, "unknown_credential"),
        ],
        "{err}"
    );
    let text = err.to_string();
    assert_eq!(text.lines().count(), got.len());
    assert!(text.lines().all(|l| l.starts_with("d.yaml:")), "{text}");
    assert!(text.contains("first defined at d.yaml:11"), "{text}");
}

#[test]
fn duplicates_across_files_and_two_kind_keys() {
    let e = errors(&[("a.yaml", GOOD), ("b.yaml", GOOD)]);
    assert_eq!(
        e,
        vec![
            ("b.yaml".into(), 3, "duplicate_name"),
            ("b.yaml".into(), 9, "duplicate_name")
        ]
    );
    let wildcard = "credentials:\n  - name: c\n    max_ttl: 1m\n    api_token: {audience: a}\nrules:\n  - name: r\n    issuer: github\n    credentials: ['*']\n    when: 'true'\n";
    assert_eq!(
        errors(&[("w.yaml", wildcard)]),
        vec![("w.yaml".into(), 8, "wildcard_allow")]
    );
}

#[test]
fn long_expressions_are_refused() {
    let long = format!(
        "rules:\n  - name: r\n    issuer: github\n    effect: deny\n    credentials: ['*']\n    when: 'claims.a == \"{}\"'\n",
        "x".repeat(5000)
    );
    assert_eq!(
        errors(&[("l.yaml", &long)]),
        vec![("l.yaml".into(), 6, "expression_too_long")]
    );
}

#[test]
fn digest_is_stable_and_content_sensitive() {
    let a = load(&[("a.yaml", GOOD), ("b.yaml", "# x\n")]).unwrap();
    let b = load(&[("b.yaml", "# x\n"), ("a.yaml", GOOD)]).unwrap();
    assert_eq!(a.digest(), b.digest(), "order of input does not matter");
    assert_eq!(a.digest().len(), 64);
    let c = load(&[("a.yaml", GOOD), ("b.yaml", "# y\n")]).unwrap();
    assert_ne!(a.digest(), c.digest());
    let d = load(&[("a.yaml", GOOD), ("c.yaml", "# x\n")]).unwrap();
    assert_ne!(a.digest(), d.digest(), "renaming a file changes the digest");
}

#[test]
fn hidden_entries_are_skipped_and_fingerprinted_like_the_loader_reads() {
    // The layout of a Kubernetes ConfigMap volume: visible symlinks into `..data`.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..2026_11_23");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("p.yaml"), "credentials: []\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_23", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/p.yaml", dir.path().join("p.yaml")).unwrap();
    std::fs::write(dir.path().join(".p.yaml.swp"), "not: [yaml").unwrap();
    let opts = LoadOptions::default();
    let b = Bundle::load_dir(dir.path(), &opts).unwrap();
    assert_eq!(
        b.digest(),
        Bundle::load_files(&[("p.yaml".into(), "credentials: []\n".into())], &opts)
            .unwrap()
            .digest()
    );
    let before = Bundle::dir_fingerprint(dir.path());
    assert_eq!(before, Bundle::dir_fingerprint(dir.path()), "stable");
    std::fs::write(data.join("p.yaml"), "credentials: []\nrules: []\n").unwrap();
    assert_ne!(
        before,
        Bundle::dir_fingerprint(dir.path()),
        "content change seen"
    );
}

#[test]
fn load_dir_walks_subdirectories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("team")).unwrap();
    std::fs::write(dir.path().join("team/a.yaml"), GOOD).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored: [").unwrap();
    let b = Bundle::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(b.rules()[0].file, "team/a.yaml");
    assert_eq!(b.digest(), load(&[("team/a.yaml", GOOD)]).unwrap().digest());
    std::fs::write(dir.path().join("team/b.yml"), "rules: 3\n").unwrap();
    let e = Bundle::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert_eq!(e.0[0].file, "team/b.yml");
}
