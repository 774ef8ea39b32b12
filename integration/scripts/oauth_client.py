#!/usr/bin/env python3
"""An off-the-shelf OAuth client (Authlib) against the live broker: RFC 8414 discovery, RFC 8693
token exchange, RFC 7662 introspection, RFC 7009 revocation, and the RFCs' error answers.

Run by integration/tests/suite/oauth.rs with the venv scripts/test installs
(target/oauth-venv). Input on stdin, JSON: {"broker": URL, "audience": the minted token's aud,
"tokens": [job tokens, each used once, fresh], "used": a job token already exchanged}.
Output on stdout, JSON: what each step saw (the Rust test asserts on it and on the store); exits
non-zero with the failed check on stderr.
"""

import json
import sys

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc6749.errors import OAuth2Error
from authlib.integrations.base_client.errors import OAuthError
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from joserfc import jwt
from joserfc.jwk import KeySet

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


def check(cond, what):
    if not cond:
        print(f"check failed: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    inp = json.load(sys.stdin)
    broker = inp["broker"].rstrip("/")
    tokens = list(inp["tokens"])
    out = {"secrets": []}

    # RFC 8414 discovery, checked by Authlib's own metadata validators. Two are left out: the
    # test broker's issuer is http://127.0.0.1 (the RFC wants https), and the broker has no
    # authorization endpoint, so it supports no response type (Authlib wants a non-empty list).
    meta = requests.get(f"{broker}/.well-known/oauth-authorization-server", timeout=10).json()
    m = AuthorizationServerMetadata(meta)
    for name in dir(m):
        if name.startswith("validate_") and name not in (
            "validate_issuer",
            "validate_response_types_supported",
            "validate",
        ):
            getattr(m, name)()
    check(meta["issuer"] == broker, f"issuer {meta['issuer']!r}")
    check(TOKEN_EXCHANGE in meta["grant_types_supported"], "token exchange advertised")
    out["metadata"] = meta

    client = OAuth2Session(client_id="ci-job", token_endpoint_auth_method="none")
    client.revocation_endpoint_auth_method = "none"

    def exchange(subject, **params):
        return client.fetch_token(
            meta["token_endpoint"],
            grant_type=TOKEN_EXCHANGE,
            subject_token=subject,
            subject_token_type=params.pop("subject_token_type", ID_TOKEN),
            **params,
        )

    # 1. Exchange, selecting the credential by its audience URI and the scope.
    tok = exchange(tokens.pop(0), resource=inp["audience"], scope="deploy:acme/api")
    out["secrets"] += [tok["access_token"], tok["revocation_token"]]
    check(tok["token_type"] == "Bearer", f"token_type {tok['token_type']!r}")
    check(tok["issued_token_type"] == ACCESS_TOKEN, "issued_token_type")
    check(0 < tok["expires_in"] <= 900, f"expires_in {tok['expires_in']}")
    out["exchange"] = {k: v for k, v in tok.items() if k not in ("access_token", "revocation_token")}

    # The access token verifies against the published JWKS (joserfc, Authlib's JOSE library).
    keys = KeySet.import_key_set(requests.get(meta["jwks_uri"], timeout=10).json())
    claims = jwt.decode(tok["access_token"], keys, algorithms=["EdDSA"]).claims
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": broker},
        aud={"essential": True, "value": inp["audience"]},
    ).validate(claims)
    out["claims"] = {"scope": claims["scope"], "gid": claims["gid"], "aud": claims["aud"]}

    # 2. Introspection (RFC 7662): active.
    r = client.introspect_token(meta["introspection_endpoint"], token=tok["access_token"])
    check(r.status_code == 200, f"introspect status {r.status_code}")
    out["introspect_before"] = r.json()

    # 3. Revocation (RFC 7009) of the access token; then introspection says inactive.
    r = client.revoke_token(meta["revocation_endpoint"], token=tok["access_token"], token_type_hint="access_token")
    out["revoke_status"] = r.status_code
    out["revoke_cache_control"] = r.headers.get("cache-control")
    r = client.introspect_token(meta["introspection_endpoint"], token=tok["access_token"])
    out["introspect_after"] = r.json()
    # Revoking again, and revoking something that is no token of ours: 200 (RFC 7009 2.2).
    out["revoke_again_status"] = client.revoke_token(meta["revocation_endpoint"], token=tok["access_token"]).status_code
    out["revoke_unknown_status"] = client.revoke_token(meta["revocation_endpoint"], token="not-a-token").status_code

    # 4. A second exchange (the credential named as `audience`, subject type :jwt), revoked
    # by its revocation handle.
    tok2 = exchange(tokens.pop(0), audience="deploy-api", subject_token_type=JWT, requested_token_type=JWT)
    out["secrets"] += [tok2["access_token"], tok2["revocation_token"]]
    out["exchange2"] = {"issued_token_type": tok2["issued_token_type"], "grant_id": tok2["grant_id"], "scope": tok2["scope"]}
    active = client.introspect_token(meta["introspection_endpoint"], token=tok2["access_token"]).json()["active"]
    r = client.revoke_token(meta["revocation_endpoint"], token=tok2["revocation_token"])
    out["handle_revoke"] = {
        "active_before": active,
        "status": r.status_code,
        "active_after": client.introspect_token(meta["introspection_endpoint"], token=tok2["access_token"]).json()["active"],
    }

    # 5. Errors, as Authlib raises them.
    def error_of(call):
        try:
            call()
        except (OAuth2Error, OAuthError) as e:
            return e.error
        return None

    errors = {}
    errors["replayed"] = error_of(lambda: exchange(inp["used"], resource=inp["audience"]))
    errors["not_allowed"] = error_of(lambda: exchange(tokens.pop(0), audience="release-api"))
    errors["unknown_target"] = error_of(lambda: exchange(tokens.pop(0), resource="https://nowhere.example"))
    errors["scope_not_offered"] = error_of(lambda: exchange(tokens.pop(0), resource=inp["audience"], scope="admin"))
    errors["bad_subject_type"] = error_of(
        lambda: exchange(tokens[0], resource=inp["audience"], subject_token_type="urn:ietf:params:oauth:token-type:saml2")
    )
    errors["garbage_token"] = error_of(lambda: exchange("not.a.jwt", resource=inp["audience"]))
    errors["grant_type"] = error_of(
        lambda: client.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
    )
    out["errors"] = errors

    # The raw error body and headers of one refusal (RFC 6749 5.2: 400, JSON, no-store).
    raw = requests.post(meta["token_endpoint"], data={"grant_type": "password"}, timeout=10)
    out["raw_error"] = {
        "status": raw.status_code,
        "body": raw.json(),
        "cache_control": raw.headers.get("cache-control"),
        "content_type": raw.headers.get("content-type"),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
