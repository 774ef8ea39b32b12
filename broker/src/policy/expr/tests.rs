//! Tests of `policy::expr`.

use super::*;
use serde_json::json;

fn compile_one(src: &str) -> Result<(CompiledExpr, RegexTable), ExprError> {
    let env = new_env();
    let mut t = RegexTable::default();
    compile(&env, src, &mut t).map(|c| (c, t))
}

fn eval(src: &str, claims: Json) -> Result<bool, String> {
    let env = Arc::new(new_env());
    let mut t = RegexTable::default();
    let c = compile(&env, src, &mut t).map_err(|e| e.to_string())?;
    let claims = claims.as_object().cloned().unwrap_or_default();
    let t = Arc::new(t);
    let eval_with = |used: &ClaimsUsed| {
        Activation::new(&env, &t, &claims, used, "github", "github")
            .and_then(|a| a.eval(&c))
            .map_err(|e| e.to_string())
    };
    // Converting only the claims the expression names never changes a result.
    let all = eval_with(&ClaimsUsed::All);
    assert_eq!(eval_with(&ClaimsUsed::of([&c])), all, "{src}");
    all
}

#[test]
fn claims_used_names_what_expressions_can_read() {
    let used = |srcs: &[&str]| {
        let exprs: Vec<CompiledExpr> = srcs.iter().map(|s| compile_one(s).unwrap().0).collect();
        ClaimsUsed::of(&exprs)
    };
    let named = |names: &[&str]| ClaimsUsed::Named(names.iter().map(|n| (*n).to_owned()).collect());
    assert_eq!(
        used(&[
            r#"claims.ref == "x" && has(claims.environment)"#,
            r#"claims["repository"].startsWith("a/") && claims.l.exists(x, x == "a")"#,
            r#"claims.sub.matches("^repo:") && issuer == "github""#,
        ]),
        named(&["environment", "l", "ref", "repository", "sub"])
    );
    assert_eq!(used(&["true"]), named(&[]));
    for whole in [
        r#""ref" in claims"#,
        "claims.size() > 3",
        r#"claims[claims.k] == "v""#,
        r#"claims.exists(k, k == "ref")"#,
        "size(claims) > 0",
    ] {
        assert_eq!(
            used(&[r#"claims.ref == "x""#, whole]),
            ClaimsUsed::All,
            "{whole}"
        );
    }
    // The same results as over every claim, including for a claim that is absent.
    let c = json!({"ref": "refs/heads/main", "sub": "repo:a/b", "other": {"deep": [1, 2]}});
    assert_eq!(
        eval(
            r#"has(claims.environment) || claims.ref.endsWith("main")"#,
            c.clone()
        ),
        Ok(true)
    );
    assert_eq!(
        eval(r#""other" in claims && claims.size() == 3"#, c.clone()),
        Ok(true)
    );
    assert!(eval("claims.missing == 1", c).is_err());
}

#[test]
fn evaluates_claims_issuer_platform() {
    let c = json!({"ref": "refs/heads/main", "n": 3, "l": ["a", "b"]});
    assert_eq!(
        eval(r#"claims.ref == "refs/heads/main""#, c.clone()),
        Ok(true)
    );
    assert_eq!(
        eval(r#"issuer == "github" && platform == "github""#, c.clone()),
        Ok(true)
    );
    assert_eq!(
        eval(r#"claims.n == 3 && "b" in claims.l"#, c.clone()),
        Ok(true)
    );
    assert!(eval("claims.missing == 1", c.clone()).is_err());
    assert!(eval("claims.ref", c).unwrap_err().contains("not a bool"));
}

#[test]
fn matches_uses_the_precompiled_table() {
    let c = json!({"ref": "refs/tags/v1.2.3"});
    assert_eq!(
        eval(r#"claims.ref.matches("^refs/tags/v[0-9]+")"#, c.clone()),
        Ok(true)
    );
    assert_eq!(eval(r#"matches(claims.ref, "^refs/heads/")"#, c), Ok(false));
    let (_, t) = compile_one(
        r#"claims.a.matches("^x$") || claims.b.matches("^x$") || claims.c.matches("^y$")"#,
    )
    .unwrap();
    assert_eq!(t.len(), 2, "identical patterns share one compiled regex");
    assert_eq!(
        compile_one(r#"claims.ref.matches(claims.pattern)"#).unwrap_err(),
        ExprError::NonLiteralPattern
    );
    assert_eq!(
        compile_one(r#"claims.ref.matches("(")"#)
            .unwrap_err()
            .reason_code(),
        "bad_pattern"
    );
    assert_eq!(
        compile_one(r#"__broker_regex(claims.ref, 0)"#)
            .unwrap_err()
            .reason_code(),
        "reserved_function"
    );
}

#[test]
fn limits_are_enforced_at_load() {
    let long = format!("claims.a == \"{}\"", "x".repeat(MAX_WHEN_LEN));
    assert!(matches!(compile_one(&long), Err(ExprError::TooLong { .. })));
    let nested = "claims.l.map(x, claims.l.map(y, y)).size() > 0";
    assert_eq!(
        compile_one(nested).unwrap_err().reason_code(),
        "nested_comprehension"
    );
    let nested2 = "claims.l.exists(x, claims.l.all(y, y == x))";
    assert!(matches!(
        compile_one(nested2),
        Err(ExprError::NestedComprehension(_))
    ));
    assert!(compile_one(r#"claims.l.exists(x, x == "a")"#).is_ok());
    assert_eq!(
        compile_one("claims.a ==").unwrap_err().reason_code(),
        "expression_syntax"
    );
}

#[test]
fn records_facts_for_lints_and_conjuncts() {
    let (c, _) = compile_one(
        r#"claims.repository_id == "1" && claims["ref"].startsWith("refs/") &&
               claims.event_name != "pull_request_target" && has(claims.environment)"#,
    )
    .unwrap();
    let names: Vec<&str> = c.claims().iter().map(String::as_str).collect();
    assert_eq!(
        names,
        vec!["environment", "event_name", "ref", "repository_id"]
    );
    assert_eq!(
        c.patterns(),
        &[PatternUse {
            function: "startsWith".into(),
            claim: "ref".into(),
            pattern: Some("refs/".into()),
        }]
    );
    assert!(!c.positive_literals().contains("pull_request_target"));
    assert!(c.positive_literals().contains("1"));
    let texts: Vec<&str> = c.conjuncts().iter().map(|x| x.source.as_str()).collect();
    assert_eq!(texts.len(), 4);
    assert_eq!(texts[0], r#"claims.repository_id == "1""#);
    assert!(texts[2].contains("pull_request_target"), "{texts:?}");
}

#[test]
fn claims_bounds() {
    let ok = json!({"a": "x", "l": [1, 2]});
    assert_eq!(check_claims(ok.as_object().unwrap()), Ok(()));
    let long_list = json!({"l": (0..65).collect::<Vec<_>>()});
    assert_eq!(
        check_claims(long_list.as_object().unwrap()),
        Err(ClaimsError::ListTooLong)
    );
    let long_str = json!({"s": "x".repeat(MAX_CLAIMS_STRING + 1)});
    assert_eq!(
        check_claims(long_str.as_object().unwrap()),
        Err(ClaimsError::StringTooLong)
    );
    let mut deep = json!(1);
    for _ in 0..MAX_CLAIMS_DEPTH {
        deep = json!({ "d": deep });
    }
    assert_eq!(
        check_claims(deep.as_object().unwrap()),
        Err(ClaimsError::TooDeep)
    );
    let big: Map<String, Json> = (0..40)
        .map(|i| (format!("k{i}"), json!("x".repeat(2000))))
        .collect();
    assert_eq!(check_claims(&big), Err(ClaimsError::TooLarge));
}
