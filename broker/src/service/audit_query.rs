//! `GET /v1/audit`: answer a parsed audit query (parsing is `admin/audit_query.rs`); the
//! query itself is audited before the page is returned.

use super::{Broker, RequestCtx};
use crate::admin::audit_query::{AUDIT_PARAMS, describe, parse_audit_query};
use crate::admin::{AdminError, AuditQueryPage, Operator};
use crate::reason::ReasonCode;

impl Broker {
    /// Answer an audit query for an authorized operator; refused parameters are audited and
    /// returned as 400, and the query itself is audited before the page is returned.
    pub async fn audit_query(
        &self,
        op: &Operator,
        pairs: &[(String, String)],
        ctx: &RequestCtx,
    ) -> Result<AuditQueryPage, AdminError> {
        // Text the store cannot hold is refused before anything else looks at it.
        for (name, value) in pairs {
            let field = AUDIT_PARAMS
                .iter()
                .find(|p| **p == name.as_str())
                .map_or_else(
                    || "a parameter name".to_owned(),
                    |p| format!("parameter {p}"),
                );
            for text in [name, value] {
                if let Err(e) = crate::store::text::check(&field, text) {
                    return Err(self.admin_invalid_text(op, "audit_query", e, ctx).await);
                }
            }
        }
        let filter = match parse_audit_query(pairs) {
            Ok(f) => f,
            Err(e) => {
                return Err(self
                    .admin_bad_request(op, "audit_query", e.to_string(), ctx)
                    .await);
            }
        };
        let page = self.store.audit_page(&filter).await?;
        let mut ev = self.admin_event(ctx, ReasonCode::AuditQuery);
        ev.actor = Some(op.actor());
        ev.outcome = crate::audit::Outcome::Success;
        ev.detail = Some(format!(
            "filter: {}; returned {}",
            describe(&filter),
            page.records.len()
        ));
        self.admin_audit(&ev).await?;
        Ok(AuditQueryPage {
            events: page.records.into_iter().map(|r| r.event).collect(),
            next_cursor: page.next_cursor.map(|c| c.to_string()),
        })
    }
}
