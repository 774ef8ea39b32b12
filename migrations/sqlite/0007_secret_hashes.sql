-- Leak response (docs/leaks.md): a credential whose secret the broker invented (a Postgres
-- password, an opaque API token) keeps the lowercase hex SHA-256 of that secret in its details
-- under `secret_sha256`. A leak report and an opaque token's introspection find the grant by
-- it. The secrets are about 190 bits of randomness, so the hash reveals nothing; the secret
-- itself is never stored.
CREATE INDEX grant_credentials_secret_sha256_idx
    ON grant_credentials (json_extract(details, '$.secret_sha256'));
