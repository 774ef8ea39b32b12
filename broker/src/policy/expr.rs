// Long on purpose (~650 lines): vetting an expression at load (size, nesting, regex rewrite, claims read) and evaluating it walk the same CEL AST; tests are in expr/tests.rs.
//! CEL `when` expressions: parsed and vetted once at load, evaluated per exchange.
//!
//! The `cel` crate has no type checker and no evaluation cost limit, so this module is where the
//! cost of a policy is bounded:
//! - a `when` is at most [`MAX_WHEN_LEN`] bytes;
//! - comprehension macros (`all`, `exists`, `exists_one`, `map`, `filter`) may not nest, so work
//!   is linear in the (bounded, see [`check_claims`]) claim sizes;
//! - `matches` must have a literal pattern; every pattern is compiled once at load into the
//!   bundle's [`RegexTable`] and the call is rewritten to a table lookup, so no regex is ever
//!   compiled per request (the built-in recompiles on every call);
//! - only the claims the bundle's expressions can read are converted into CEL values per
//!   exchange ([`ClaimsUsed`]); a GitHub job token carries about 30 claims, a policy reads a few.
//!
//! Invariant: evaluation never panics on attacker-controlled claims; every failure is an `Err`
//! the caller turns into a fail-closed decision.

use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::common::types::CelInt;
use cel::{Context, Env, ExecutionError, Value};
use regex::Regex;
use serde_json::{Map, Value as Json};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Upper bound on the length of one `when` expression, in bytes.
pub const MAX_WHEN_LEN: usize = 4096;
/// Bounds on the claims an expression may be evaluated over.
pub const MAX_CLAIMS_BYTES: usize = 64 * 1024;
pub const MAX_CLAIMS_DEPTH: usize = 8;
pub const MAX_CLAIMS_LIST: usize = 64;
pub const MAX_CLAIMS_STRING: usize = 4096;
/// Upper bound on a compiled regex program (bytes), well above any sane claim pattern.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The function `matches` calls are rewritten to: `__broker_regex(subject, table_index)`.
/// Reserved: a user-written call to it is a load error, so only the rewrite produces it.
const REGEX_FN: &str = "__broker_regex";

/// Why an expression was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("expression is {len} bytes, longer than the limit of {MAX_WHEN_LEN}")]
    TooLong { len: usize },
    #[error("CEL syntax error: {0}")]
    Syntax(String),
    #[error("comprehension macros ({0}) may not be nested inside one another")]
    NestedComprehension(String),
    #[error("the pattern of matches() must be a string literal")]
    NonLiteralPattern,
    #[error("invalid regular expression {pattern:?}: {message}")]
    BadPattern { pattern: String, message: String },
    #[error("{0}() is reserved")]
    Reserved(String),
}

impl ExprError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            ExprError::TooLong { .. } => "expression_too_long",
            ExprError::Syntax(_) => "expression_syntax",
            ExprError::NestedComprehension(_) => "nested_comprehension",
            ExprError::NonLiteralPattern => "non_literal_pattern",
            ExprError::BadPattern { .. } => "bad_pattern",
            ExprError::Reserved(_) => "reserved_function",
        }
    }
}

/// Every regex of a bundle, compiled once; expressions refer to entries by index.
#[derive(Debug, Default)]
pub struct RegexTable {
    regexes: Vec<Regex>,
    index: HashMap<String, usize>,
}

impl RegexTable {
    /// Index of `pattern`, compiling it on first sight.
    fn intern(&mut self, pattern: &str) -> Result<usize, ExprError> {
        if let Some(i) = self.index.get(pattern) {
            return Ok(*i);
        }
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| ExprError::BadPattern {
                pattern: pattern.to_owned(),
                message: e.to_string().lines().last().unwrap_or("").trim().to_owned(),
            })?;
        let i = self.regexes.len();
        self.regexes.push(re);
        self.index.insert(pattern.to_owned(), i);
        Ok(i)
    }

    /// Number of distinct compiled patterns.
    pub fn len(&self) -> usize {
        self.regexes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty()
    }
}

/// A call of a string-prefix/pattern function on a claim, recorded for lints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternUse {
    /// `startsWith`, `endsWith`, `contains`, `matches`.
    pub function: String,
    pub claim: String,
    /// The literal pattern/prefix, when it is one.
    pub pattern: Option<String>,
}

/// One top-level `&&` operand of a `when`, kept for explanations.
#[derive(Debug, Clone)]
pub struct Conjunct {
    pub source: String,
    ast: IdedExpr,
}

/// A vetted, compiled `when`.
#[derive(Debug, Clone)]
pub struct CompiledExpr {
    source: String,
    ast: IdedExpr,
    conjuncts: Vec<Conjunct>,
    claims: BTreeSet<String>,
    /// `claims` is used other than through a literal name (`"x" in claims`, `claims.size()`,
    /// `claims[claims.k]`, a comprehension over it): every claim may be read.
    whole_claims: bool,
    patterns: Vec<PatternUse>,
    /// String literals compared for equality/membership (not under `!=` or `!`).
    positive_literals: BTreeSet<String>,
}

impl CompiledExpr {
    pub fn source(&self) -> &str {
        &self.source
    }
    /// Top-level claim names the expression reads (`claims.x`, `claims["x"]`, `has(claims.x)`).
    pub fn claims(&self) -> &BTreeSet<String> {
        &self.claims
    }
    pub fn patterns(&self) -> &[PatternUse] {
        &self.patterns
    }
    pub fn positive_literals(&self) -> &BTreeSet<String> {
        &self.positive_literals
    }
    pub fn conjuncts(&self) -> &[Conjunct] {
        &self.conjuncts
    }
}

/// The top-level claims a set of expressions can read. An evaluation converts only these from
/// JSON into CEL values: a claim no expression names cannot change any result, and converting
/// all of a token's claims was most of the cost of evaluating a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsUsed {
    /// Only these names (read as `claims.x`, `claims["x"]` or `has(claims.x)`).
    Named(BTreeSet<String>),
    /// Some expression uses `claims` as a whole: convert every claim.
    All,
}

impl ClaimsUsed {
    pub fn of<'a>(exprs: impl IntoIterator<Item = &'a CompiledExpr>) -> Self {
        let mut names = BTreeSet::new();
        for e in exprs {
            if e.whole_claims {
                return Self::All;
            }
            names.extend(e.claims.iter().cloned());
        }
        Self::Named(names)
    }

    /// `claims` as the CEL value an evaluation sees.
    fn to_value(&self, claims: &Map<String, Json>) -> Result<Value, EvalError> {
        let not_representable =
            |e: cel::SerializationError| EvalError::NotRepresentable(e.to_string());
        match self {
            Self::All => cel::to_value(claims).map_err(not_representable),
            Self::Named(names) => {
                let mut map = HashMap::with_capacity(names.len());
                for name in names {
                    if let Some(v) = claims.get(name) {
                        map.insert(name.clone(), cel::to_value(v).map_err(not_representable)?);
                    }
                }
                Ok(Value::from(map))
            }
        }
    }
}

/// Whether `claims` appears anywhere other than as the base of `claims.x` / `claims["x"]`.
fn reads_whole_claims(e: &IdedExpr) -> bool {
    if claim_name(e).is_some() {
        // The base is the `claims` identifier and the key a literal: nothing else below.
        return false;
    }
    match &e.expr {
        Expr::Ident(n) => n == "claims",
        _ => children(e).into_iter().any(reads_whole_claims),
    }
}

/// The CEL environment shared by every expression of a bundle.
pub fn new_env() -> Env {
    Env::stdlib()
}

/// Parse and vet `source`; patterns go into `table`.
pub fn compile(env: &Env, source: &str, table: &mut RegexTable) -> Result<CompiledExpr, ExprError> {
    if source.len() > MAX_WHEN_LEN {
        return Err(ExprError::TooLong { len: source.len() });
    }
    let (mut ast, info) = env
        .parser()
        .parse_with_source_info(source)
        .map_err(|e| ExprError::Syntax(syntax_message(&e)))?;
    check_nesting(&ast, None)?;
    let mut facts = Facts::default();
    collect(&ast, false, &mut facts);
    rewrite_matches(&mut ast, table)?;
    let whole_claims = reads_whole_claims(&ast);
    let chars: Vec<char> = source.chars().collect();
    let mut parts = Vec::new();
    split_and(&ast, &mut parts);
    let conjuncts = if parts.len() > 1 {
        parts
            .into_iter()
            .map(|c| Conjunct {
                source: span_text(&c, &info, &chars),
                ast: c,
            })
            .collect()
    } else {
        vec![Conjunct {
            source: source.trim().to_owned(),
            ast: ast.clone(),
        }]
    };
    Ok(CompiledExpr {
        source: source.to_owned(),
        ast,
        conjuncts,
        claims: facts.claims,
        whole_claims,
        patterns: facts.patterns,
        positive_literals: facts.literals,
    })
}

fn syntax_message(e: &cel::ParseErrors) -> String {
    let msgs: Vec<String> = e
        .errors
        .iter()
        .map(|p| format!("{}:{}: {}", p.pos.0, p.pos.1, p.msg))
        .collect();
    if msgs.is_empty() {
        "unparseable expression".to_owned()
    } else {
        msgs.join("; ")
    }
}

/// Children of a node, in source order.
fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Expr::Call(c) => c
            .target
            .as_deref()
            .into_iter()
            .chain(c.args.iter())
            .collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(l) => l.elements.iter().collect(),
        Expr::Map(m) => entry_children(&m.entries),
        Expr::Struct(s) => entry_children(&s.entries),
        Expr::Select(s) => vec![&s.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => Vec::new(),
    }
}

fn entry_children(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&IdedExpr> {
    let mut out = Vec::new();
    for e in entries {
        match &e.expr {
            EntryExpr::MapEntry(m) => {
                out.push(&m.key);
                out.push(&m.value);
            }
            EntryExpr::StructField(f) => out.push(&f.value),
        }
    }
    out
}

/// Refuse a comprehension anywhere inside another: nested loops multiply cost.
fn check_nesting(e: &IdedExpr, outer: Option<&str>) -> Result<(), ExprError> {
    let inside = if let Expr::Comprehension(_) = &e.expr {
        if let Some(o) = outer {
            return Err(ExprError::NestedComprehension(o.to_owned()));
        }
        Some("all/exists/exists_one/map/filter")
    } else {
        outer
    };
    // A literal call of a macro name that was not expanded (wrong arity) is harmless: it
    // fails at evaluation as an unknown overload.
    for c in children(e) {
        check_nesting(c, inside)?;
    }
    Ok(())
}

#[derive(Default)]
struct Facts {
    claims: BTreeSet<String>,
    patterns: Vec<PatternUse>,
    literals: BTreeSet<String>,
}

fn string_literal(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

/// `claims.x` or `claims["x"]` → `x`.
fn claim_name(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Expr::Select(s) => match &s.operand.expr {
            Expr::Ident(n) if n == "claims" => Some(s.field.as_str()),
            _ => None,
        },
        Expr::Call(c) if c.func_name == operators::INDEX && c.target.is_none() => {
            match (c.args.first(), c.args.get(1)) {
                (Some(base), Some(key)) if matches!(&base.expr, Expr::Ident(n) if n == "claims") => {
                    string_literal(key)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn collect(e: &IdedExpr, negated: bool, f: &mut Facts) {
    if let Some(name) = claim_name(e) {
        f.claims.insert(name.to_owned());
    }
    let mut negated = negated;
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) if !negated => {
            f.literals.insert(s.inner().to_owned());
        }
        Expr::Call(c) => {
            if c.func_name == operators::NOT_EQUALS || c.func_name == operators::LOGICAL_NOT {
                negated = !negated;
            }
            let subject = match (&c.target, c.args.first()) {
                (Some(t), _) => Some(&**t),
                (None, Some(a)) if c.args.len() == 2 => Some(a),
                _ => None,
            };
            if ["startsWith", "endsWith", "contains", "matches"].contains(&c.func_name.as_str())
                && let Some(claim) = subject.and_then(claim_name)
            {
                let arg = if c.target.is_some() {
                    c.args.first()
                } else {
                    c.args.get(1)
                };
                f.patterns.push(PatternUse {
                    function: c.func_name.clone(),
                    claim: claim.to_owned(),
                    pattern: arg.and_then(string_literal).map(str::to_owned),
                });
            }
        }
        _ => {}
    }
    for c in children(e) {
        collect(c, negated, f);
    }
}

/// Replace `s.matches("p")` / `matches(s, "p")` with `__broker_regex(s, i)` where `i` indexes
/// the precompiled table.
fn rewrite_matches(e: &mut IdedExpr, table: &mut RegexTable) -> Result<(), ExprError> {
    if let Expr::Call(c) = &mut e.expr {
        if c.func_name == REGEX_FN {
            return Err(ExprError::Reserved(REGEX_FN.to_owned()));
        }
        if c.func_name == "matches" {
            let (subject, pattern) = match (c.target.take(), c.args.len()) {
                (Some(t), 1) => (*t, c.args.remove(0)),
                (None, 2) => {
                    let p = c.args.remove(1);
                    (c.args.remove(0), p)
                }
                // Wrong arity: leave it; it fails at evaluation (fail closed).
                (t, _) => {
                    c.target = t;
                    return Ok(());
                }
            };
            let lit = string_literal(&pattern).ok_or(ExprError::NonLiteralPattern)?;
            let index = table.intern(lit)?;
            let mut subject = subject;
            rewrite_matches(&mut subject, table)?;
            let index_expr = IdedExpr {
                id: pattern.id,
                expr: Expr::Literal(LiteralValue::Int(CelInt::from(index as i64))),
            };
            *c = CallExpr {
                func_name: REGEX_FN.to_owned(),
                target: None,
                args: vec![subject, index_expr],
            };
            return Ok(());
        }
    }
    match &mut e.expr {
        Expr::Call(c) => {
            if let Some(t) = c.target.as_deref_mut() {
                rewrite_matches(t, table)?;
            }
            for a in &mut c.args {
                rewrite_matches(a, table)?;
            }
        }
        Expr::Comprehension(c) => {
            for x in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                rewrite_matches(x, table)?;
            }
        }
        Expr::List(l) => {
            for x in &mut l.elements {
                rewrite_matches(x, table)?;
            }
        }
        Expr::Map(m) => rewrite_entries(&mut m.entries, table)?,
        Expr::Struct(s) => rewrite_entries(&mut s.entries, table)?,
        Expr::Select(s) => rewrite_matches(&mut s.operand, table)?,
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
    Ok(())
}

fn rewrite_entries(
    entries: &mut [cel::common::ast::IdedEntryExpr],
    table: &mut RegexTable,
) -> Result<(), ExprError> {
    for e in entries {
        match &mut e.expr {
            EntryExpr::MapEntry(m) => {
                rewrite_matches(&mut m.key, table)?;
                rewrite_matches(&mut m.value, table)?;
            }
            EntryExpr::StructField(f) => rewrite_matches(&mut f.value, table)?,
        }
    }
    Ok(())
}

/// Flatten the top-level `&&` chain into its operands.
fn split_and(e: &IdedExpr, out: &mut Vec<IdedExpr>) {
    if let Expr::Call(c) = &e.expr
        && c.func_name == operators::LOGICAL_AND
        && c.target.is_none()
        && c.args.len() == 2
    {
        for a in &c.args {
            split_and(a, out);
        }
        return;
    }
    out.push(e.clone());
}

/// Source text of a subtree: from the smallest to the largest offset of its nodes.
fn span_text(e: &IdedExpr, info: &cel::common::ast::SourceInfo, chars: &[char]) -> String {
    fn walk(e: &IdedExpr, info: &cel::common::ast::SourceInfo, lo: &mut u32, hi: &mut u32) {
        if let Some((s, t)) = info.offset_for(e.id) {
            *lo = (*lo).min(s);
            *hi = (*hi).max(t);
        }
        for c in children(e) {
            walk(c, info, lo, hi);
        }
    }
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    walk(e, info, &mut lo, &mut hi);
    if lo == u32::MAX || lo as usize >= chars.len() {
        return "<expression>".to_owned();
    }
    let end = (hi as usize)
        .saturating_add(1)
        .min(chars.len())
        .max(lo as usize);
    let mut text: String = chars[lo as usize..end].iter().collect();
    // Offsets cover tokens, not the parentheses around a group: rebalance for display.
    let opens = text.matches('(').count();
    let closes = text.matches(')').count();
    for _ in closes..opens {
        text.push(')');
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Why claims were refused before evaluation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    #[error("claims serialize to more than {MAX_CLAIMS_BYTES} bytes")]
    TooLarge,
    #[error("claims nest deeper than {MAX_CLAIMS_DEPTH}")]
    TooDeep,
    #[error("a claim list has more than {MAX_CLAIMS_LIST} items")]
    ListTooLong,
    #[error("a claim string is longer than {MAX_CLAIMS_STRING} bytes")]
    StringTooLong,
}

/// Refuse claim maps whose size would make evaluation expensive.
pub fn check_claims(claims: &Map<String, Json>) -> Result<(), ClaimsError> {
    fn walk(v: &Json, depth: usize) -> Result<(), ClaimsError> {
        if depth > MAX_CLAIMS_DEPTH {
            return Err(ClaimsError::TooDeep);
        }
        match v {
            Json::String(s) if s.len() > MAX_CLAIMS_STRING => Err(ClaimsError::StringTooLong),
            Json::Array(a) => {
                if a.len() > MAX_CLAIMS_LIST {
                    return Err(ClaimsError::ListTooLong);
                }
                a.iter().try_for_each(|x| walk(x, depth + 1))
            }
            Json::Object(m) => m.iter().try_for_each(|(k, x)| {
                if k.len() > MAX_CLAIMS_STRING {
                    return Err(ClaimsError::StringTooLong);
                }
                walk(x, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    // The top-level map is depth 1.
    for (k, v) in claims {
        if k.len() > MAX_CLAIMS_STRING {
            return Err(ClaimsError::StringTooLong);
        }
        walk(v, 2)?;
    }
    let size = serde_json::to_vec(claims)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_CLAIMS_BYTES {
        return Err(ClaimsError::TooLarge);
    }
    Ok(())
}

/// Why claims could not be evaluated, or an expression did not yield a bool. Policies fail
/// closed on it: a deny rule counts as matched, an allow rule does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The claims were refused before any rule ran ([`check_claims`]).
    #[error(transparent)]
    Claims(#[from] ClaimsError),
    #[error("claims not representable: {0}")]
    NotRepresentable(String),
    /// The evaluation context could not be built (the CEL library's message).
    #[error("{0}")]
    Context(String),
    /// The expression yielded a value of another type (its CEL type name).
    #[error("evaluated to {0}, not a bool")]
    NotBool(String),
    /// The CEL runtime's message (no such key, a type mismatch, …).
    #[error("{0}")]
    Execution(String),
}

/// Variables and functions for evaluating a bundle's expressions over one exchange.
pub struct Activation {
    ctx: Context<'static, 'static>,
}

impl Activation {
    /// Build the evaluation context for expressions that read `used` of `claims`. Claims must
    /// already have passed [`check_claims`].
    pub fn new(
        env: &Arc<Env>,
        regexes: &Arc<RegexTable>,
        claims: &Map<String, Json>,
        used: &ClaimsUsed,
        issuer: &str,
        platform: &str,
    ) -> Result<Self, EvalError> {
        let mut ctx = Context::with_env(Arc::clone(env));
        ctx.add_variable_from_value("claims", used.to_value(claims)?);
        ctx.add_variable_from_value("issuer", issuer.to_owned());
        ctx.add_variable_from_value("platform", platform.to_owned());
        let table = Arc::clone(regexes);
        ctx.add_function(
            REGEX_FN,
            move |subject: Arc<String>, index: i64| -> Result<Value, ExecutionError> {
                let re = usize::try_from(index)
                    .ok()
                    .and_then(|i| table.regexes.get(i))
                    .ok_or_else(|| ExecutionError::function_error("matches", "unknown pattern"))?;
                Ok(Value::Bool(re.is_match(&subject)))
            },
        )
        .map_err(|e| EvalError::Context(e.to_string()))?;
        Ok(Self { ctx })
    }

    /// Evaluate a whole `when`; anything but a bool is an error.
    pub fn eval(&self, e: &CompiledExpr) -> Result<bool, EvalError> {
        self.eval_ast(&e.ast)
    }

    /// Evaluate one conjunct.
    pub fn eval_conjunct(&self, c: &Conjunct) -> Result<bool, EvalError> {
        self.eval_ast(&c.ast)
    }

    fn eval_ast(&self, ast: &IdedExpr) -> Result<bool, EvalError> {
        match Value::resolve(ast, &self.ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(EvalError::NotBool(format!("{:?}", other.type_of()))),
            Err(e) => Err(EvalError::Execution(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
