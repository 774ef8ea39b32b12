//! Recovery and scope: issuer backoff, webhook secret scope, request ids and diagnostics.
