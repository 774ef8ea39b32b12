'use strict';
// Pure helpers of the action: parsing inputs, classifying fields, naming environment variables,
// retrying HTTP calls, explaining refusals. No @actions/core here, so node tests need no runner.
//
// Invariants (the same as the broker's own client, broker/src/client.rs):
// - a response field is secret unless its name is on PUBLIC_FIELDS (fail closed for new kinds);
// - network errors, 5xx and 429 are retried with backoff; 4xx never (a 401/403 is final), nor
//   an untrusted TLS certificate (TlsError);
// - no two credentials export the same variable (several of one kind are prefixed or become
//   AWS profiles; a remaining clash fails the step);
// - nothing here formats a secret into an error message.

const PUBLIC_FIELDS = new Set([
  'kind', 'expires_at', 'token_type', 'audience', 'scope', 'token_id', 'username', 'user',
  'host', 'port', 'database', 'region', 'role_arn', 'session_name', 'expiration', 'account_id',
  'sslmode',
  // ssh_cert: a certificate and its public key are public by nature (hosts log the serial and
  // key id); the private key, when the broker made one, is not.
  'certificate', 'public_key', 'serial', 'key_id', 'principals', 'valid_after',
  // github_app: what the token may reach (the token itself is secret).
  'owner', 'repositories', 'permissions', 'api_url',
]);

const MAX_RETRY_AFTER_MS = 30_000;

/** `deploy-api` -> `DEPLOY_API`. */
function envStem(name) {
  let s = String(name).replace(/[^A-Za-z0-9]/g, '_').toUpperCase();
  if (/^[0-9]/.test(s)) s = `_${s}`;
  return s;
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * The `credentials` input: names separated by commas or newlines; `name=VAR` puts the
 * credential's main secret in environment variable VAR.
 */
function parseCredentials(input) {
  const out = [];
  for (const raw of String(input || '').split(/[,\n]/)) {
    const item = raw.trim();
    if (!item || item.startsWith('#')) continue;
    const eq = item.indexOf('=');
    const name = (eq < 0 ? item : item.slice(0, eq)).trim();
    const envName = eq < 0 ? null : item.slice(eq + 1).trim();
    if (!name) throw new Error(`credentials: empty name in ${JSON.stringify(item)}`);
    if (envName !== null && !ENV_NAME.test(envName)) {
      throw new Error(`credentials: ${JSON.stringify(envName)} is not a valid environment variable name`);
    }
    out.push({ name, envName });
  }
  if (out.length === 0) throw new Error('credentials: give at least one credential name');
  return out;
}

/** `true`/`false` inputs, as the runner passes them. */
function parseBool(v, dflt) {
  const s = String(v === undefined || v === null ? '' : v).trim().toLowerCase();
  if (s === '') return dflt;
  if (['true', 'yes', '1', 'on'].includes(s)) return true;
  if (['false', 'no', '0', 'off'].includes(s)) return false;
  throw new Error(`expected true or false, got ${JSON.stringify(v)}`);
}

/**
 * Parse the broker's exchange answer into
 * `{grantId, expiresAt, revocationToken, credentials: [{name, kind, fields: {k: {value, secret}}}]}`.
 */
function parseGrant(body) {
  if (!body || typeof body !== 'object') throw new Error('the broker sent no JSON object');
  for (const k of ['grant_id', 'expires_at', 'revocation_token']) {
    if (typeof body[k] !== 'string') throw new Error(`the broker's answer lacks \`${k}\``);
  }
  if (!body.credentials || typeof body.credentials !== 'object') {
    throw new Error("the broker's answer lacks `credentials`");
  }
  const credentials = Object.entries(body.credentials).map(([name, c]) => {
    const fields = {};
    for (const [k, v] of Object.entries(c || {})) {
      if (v === null || v === undefined) continue;
      const value = typeof v === 'string' ? v : JSON.stringify(v);
      fields[k] = { value, secret: !PUBLIC_FIELDS.has(k) };
    }
    return { name, kind: typeof c.kind === 'string' ? c.kind : 'unknown', fields };
  });
  return {
    grantId: body.grant_id,
    expiresAt: body.expires_at,
    revocationToken: body.revocation_token,
    credentials,
  };
}

/**
 * Every secret value of a grant (what must be masked before anything is printed). A value of
 * several lines (a private key) is also given line by line: the runner masks per line.
 */
function secretValues(grant) {
  const out = [grant.revocationToken];
  for (const c of grant.credentials) {
    for (const f of Object.values(c.fields)) {
      if (!f.secret || !f.value) continue;
      out.push(f.value);
      if (f.value.includes('\n')) {
        for (const line of f.value.split('\n')) if (line.trim().length >= 8 && !line.startsWith('-----')) out.push(line.trim());
      }
    }
  }
  return out;
}

/** The `sslmode` of a libpq URL (`...?sslmode=require`), or null. The URL is secret; its mode is not. */
function sslModeOf(url) {
  try {
    const mode = new URL(url).searchParams.get('sslmode');
    return mode && /^[a-z-]+$/.test(mode) ? mode : null;
  } catch {
    return null;
  }
}

/** The 12-digit account of an ARN (`arn:aws:iam::123456789012:role/x`), or null. */
function accountOfArn(arn) {
  const m = /^arn:[a-z-]+:[a-z]+:[^:]*:([0-9]{12}):/.exec(String(arn || ''));
  return m ? m[1] : null;
}

/** AWS profile names: the credential's name, restricted so it cannot break the INI files. */
const PROFILE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

/**
 * Environment variables per kind, the same names as `broker exchange`:
 * - api_token -> <NAME>_TOKEN;
 * - postgres -> PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE, DATABASE_URL;
 * - aws_sts -> AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
 *   AWS_DEFAULT_REGION, AWS_CREDENTIAL_EXPIRATION, AWS_ACCOUNT_ID (when known);
 * - anything else -> <NAME>_<FIELD> for every field.
 * A requested name (`name=VAR`) replaces the main variable (api_token's token, postgres's
 * DATABASE_URL). Names never collide: when a step gets several postgres credentials, every
 * one's variables carry the prefix `<NAME>_` (ANALYTICS_DB_PGUSER); several aws_sts credentials
 * get no AWS_* variables at all but one named profile each (`awsProfiles`), so one cannot
 * silently shadow another.
 * Returns [{name, value, secret}].
 */
function envVars(grant, requests) {
  const out = [];
  const count = {};
  for (const c of grant.credentials) count[c.kind] = (count[c.kind] || 0) + 1;
  for (const c of grant.credentials) {
    const req = (requests || []).find((r) => r.name === c.name);
    const custom = req && req.envName;
    const stem = envStem(c.name);
    const f = (k) => c.fields[k];
    const push = (name, field) => { if (field) out.push({ name, value: field.value, secret: field.secret }); };
    if (c.kind === 'api_token') {
      push(custom || `${stem}_TOKEN`, f('token'));
    } else if (c.kind === 'postgres') {
      const p = count.postgres > 1 ? `${stem}_` : '';
      const url = f('database_url') || f('url');
      push(`${p}PGHOST`, f('host'));
      push(`${p}PGPORT`, f('port'));
      push(`${p}PGDATABASE`, f('database'));
      push(`${p}PGUSER`, f('username') || f('user'));
      push(`${p}PGPASSWORD`, f('password'));
      const mode = f('sslmode') ? f('sslmode').value : url && sslModeOf(url.value);
      if (mode) push(`${p}PGSSLMODE`, { value: mode, secret: false });
      push(custom || `${p}DATABASE_URL`, url);
    } else if (c.kind === 'github_app') {
      // One App token: GH_TOKEN (what `gh` and most tools read); several: <NAME>_TOKEN each.
      push(custom || (count.github_app > 1 ? `${stem}_TOKEN` : 'GH_TOKEN'), f('token'));
    } else if (c.kind === 'ssh_cert') {
      // The key and certificate go to files (main.js: <NAME>_IDENTITY_FILE,
      // <NAME>_CERTIFICATE_FILE), never to the environment.
      push(`${stem}_SSH_SERIAL`, f('serial'));
    } else if (c.kind === 'aws_sts') {
      if (count.aws_sts > 1) continue; // awsProfiles
      push('AWS_ACCESS_KEY_ID', f('access_key_id'));
      push('AWS_SECRET_ACCESS_KEY', f('secret_access_key'));
      push('AWS_SESSION_TOKEN', f('session_token'));
      push('AWS_REGION', f('region'));
      push('AWS_DEFAULT_REGION', f('region'));
      const exp = f('expiration') || f('expires_at');
      // The expiry is not a secret (the SDKs read it to refresh in time); never masked.
      if (exp) push('AWS_CREDENTIAL_EXPIRATION', { value: exp.value, secret: false });
      const account = awsAccount(c);
      if (account) push('AWS_ACCOUNT_ID', { value: account, secret: false });
    } else {
      for (const k of Object.keys(c.fields).sort()) {
        if (k !== 'kind') push(`${stem}_${envStem(k)}`, f(k));
      }
    }
  }
  // An override (or two names with the same stem) could still make one variable shadow
  // another: refuse rather than export a credential under a name another one also uses.
  const seen = new Set();
  for (const v of out) {
    if (seen.has(v.name)) throw new Error(`two credentials would set ${v.name}: rename one with \`name=VAR\``);
    seen.add(v.name);
  }
  return out;
}

/** The account of an aws_sts credential: its `account_id` field, else from a role ARN field. */
function awsAccount(c) {
  const id = c.fields.account_id && c.fields.account_id.value;
  if (id && /^[0-9]{12}$/.test(id)) return id;
  for (const k of ['role_arn', 'assumed_role_arn']) {
    const a = c.fields[k] && accountOfArn(c.fields[k].value);
    if (a) return a;
  }
  return null;
}

/**
 * Several aws_sts credentials in one step: the text of a shared credentials file and a config
 * file with one profile per credential (profile name = credential name), or null when the
 * step has fewer than two. Throws on a name that is not a safe profile name (fail closed).
 */
function awsProfiles(grant) {
  const aws = grant.credentials.filter((c) => c.kind === 'aws_sts');
  if (aws.length < 2) return null;
  let credentials = '';
  let config = '';
  for (const c of aws) {
    if (!PROFILE_NAME.test(c.name)) {
      throw new Error(`credential ${JSON.stringify(c.name)} cannot name an AWS profile`);
    }
    const v = (k) => (c.fields[k] ? c.fields[k].value : '');
    for (const [k, val] of Object.entries({ access_key_id: v('access_key_id'), secret_access_key: v('secret_access_key'), session_token: v('session_token'), region: v('region') })) {
      if (/[\r\n]/.test(val)) throw new Error(`credential ${JSON.stringify(c.name)}: ${k} spans lines`);
    }
    credentials += `[${c.name}]\naws_access_key_id = ${v('access_key_id')}\n`
      + `aws_secret_access_key = ${v('secret_access_key')}\naws_session_token = ${v('session_token')}\n\n`;
    config += `[profile ${c.name}]\n${v('region') ? `region = ${v('region')}\n` : ''}\n`;
  }
  return { credentials, config, profiles: aws.map((c) => c.name) };
}

/**
 * The `ssh-keys` input: credential names (commas or newlines) whose key pair the action makes on
 * the runner, sending only the public key. Each must also be requested.
 */
function parseSshKeys(input, requests) {
  const names = String(input || '').split(/[,\n]/).map((s) => s.trim()).filter((s) => s && !s.startsWith('#'));
  for (const n of names) {
    if (!requests.some((r) => r.name === n)) throw new Error(`ssh-keys: ${JSON.stringify(n)} is not in credentials`);
  }
  return [...new Set(names)];
}

/**
 * The files of each ssh_cert credential: `{name, identity, certificate}` where identity is the
 * runner's own private key (`localKeys[name]`) or the one the broker made, or null when
 * neither is there (the credential then cannot be used and main fails).
 */
function sshFiles(grant, localKeys) {
  return grant.credentials.filter((c) => c.kind === 'ssh_cert').map((c) => ({
    name: c.name,
    identity: (localKeys && localKeys[c.name]) || (c.fields.private_key && c.fields.private_key.value) || null,
    certificate: c.fields.certificate ? `${c.fields.certificate.value}\n` : null,
  }));
}

/** Step outputs: `grant-id`, `expires-at`, and `<credential>-<field>` for every field. */
function outputs(grant) {
  const out = [
    { name: 'grant-id', value: grant.grantId, secret: false },
    { name: 'expires-at', value: grant.expiresAt, secret: false },
  ];
  for (const c of grant.credentials) {
    for (const [k, f] of Object.entries(c.fields)) {
      out.push({ name: `${c.name}-${k.replace(/_/g, '-')}`, value: f.value, secret: f.secret });
    }
  }
  return out;
}

/** An error the broker (or the network) returned; carries no secret. */
class BrokerError extends Error {
  constructor(status, code, message) {
    super(`the broker refused (${status} ${code}): ${message}`);
    this.status = status;
    this.code = code;
  }
  get refusal() { return this.status === 401 || this.status === 403; }
}

class NetworkError extends Error {
  constructor(detail) {
    super(`cannot reach the broker: ${detail}`);
    this.code = 'broker_unreachable';
  }
}

/** The broker's certificate is not trusted: final (retrying cannot help), never bypassed. */
class TlsError extends Error {
  constructor(detail, via) {
    super(`the broker's TLS certificate is not trusted (${detail})${via ? ` (through the proxy ${via})` : ''}: `
      + 'if the broker uses a private CA, give that CA\'s PEM in the `ca-certificate` input');
    this.code = 'tls_untrusted';
  }
}

const TLS_CODE = /CERT|ISSUER|SELF_SIGNED|ALTNAME|SIGNATURE|INVALID_CA/;

/** The most specific system error code in an error's `cause` chain (ECONNREFUSED, ...), or null. */
function errorCode(e) {
  let code = null;
  for (let c = e, i = 0; c && typeof c === 'object' && i < 8; c = c.cause, i++) {
    if (typeof c.code === 'string' && /^[A-Z0-9_]+$/.test(c.code)) code = c.code;
  }
  return code;
}

/** A transport failure as NetworkError (retried) or TlsError (final). Names codes, never data. */
function transportError(e) {
  if (e && e.name === 'TimeoutError') return new NetworkError('timed out');
  const code = errorCode(e);
  const via = e && typeof e.via === 'string' ? e.via : null;
  if (code && TLS_CODE.test(code)) return new TlsError(code, via);
  const proxy = via ? ` through the proxy ${via}` : '';
  return new NetworkError(`connection failed${code ? ` (${code})` : ''}${proxy}`);
}

/**
 * Reason codes of a 5xx that a retry cannot fix: the broker refused this request's own data
 * (`store_rejected`), so the same request fails the same way; retrying would only delay the
 * error. Kept in step with the client's rule (`broker exchange`).
 */
const FINAL_SERVER_CODES = new Set(['store_rejected']);

function retryable(err) {
  if (err instanceof NetworkError) return true;
  if (!(err instanceof BrokerError)) return false;
  if (FINAL_SERVER_CODES.has(err.code)) return false;
  return err.status === 429 || err.status >= 500;
}

/** Backoff before retry `n` (0-based): base * 2^n capped at max, up to 25% jitter, at least Retry-After. */
function delayMs(n, { baseMs = 500, maxMs = 10_000 } = {}, retryAfterS = null, random = Math.random) {
  const exp = Math.min(baseMs * 2 ** Math.min(n, 16), maxMs);
  const wait = exp + Math.floor(random() * (exp / 4));
  if (retryAfterS !== null && Number.isFinite(retryAfterS)) {
    return Math.max(wait, Math.min(retryAfterS * 1000, MAX_RETRY_AFTER_MS));
  }
  return wait;
}

function cleanText(v, dflt) {
  // eslint-disable-next-line no-control-regex
  return (typeof v === 'string' ? v : dflt).replace(/[\u0000-\u001f\u007f]/g, '').slice(0, 300);
}

/**
 * The `attempts` input: tries in all, a whole number of at least 1 (empty: 5). `0` or anything
 * else is refused rather than quietly replaced, as the client (`broker exchange`) does.
 */
function parseAttempts(text) {
  const t = String(text ?? '').trim();
  if (t === '') return 5;
  if (!/^[0-9]+$/.test(t) || Number(t) < 1 || Number(t) > 100) {
    throw new Error(`attempts must be a whole number from 1 to 100, got "${t.slice(0, 20)}"`);
  }
  return Number(t);
}

/**
 * POST to the broker with retries. `makeRequest()` is called per attempt and returns
 * `{url, headers, body}` (so a fresh job token can be fetched each time).
 * Returns the parsed JSON of a 2xx answer; throws BrokerError / NetworkError.
 */
async function postWithRetries(makeRequest, opts = {}) {
  const attempts = Math.max(1, opts.attempts || 5);
  const fetchFn = opts.fetch || globalThis.fetch;
  const sleep = opts.sleep || ((ms) => new Promise((r) => setTimeout(r, ms)));
  const notice = opts.notice || (() => {});
  const timeoutMs = opts.timeoutMs || 30_000;
  for (let n = 1; ; n++) {
    let err;
    let retryAfter = null;
    const req = await makeRequest();
    try {
      const resp = await fetchFn(req.url, {
        method: 'POST',
        headers: req.headers,
        body: req.body,
        redirect: 'error',
        signal: AbortSignal.timeout(timeoutMs),
      });
      let body = null;
      try { body = await resp.json(); } catch { body = null; }
      if (resp.status >= 200 && resp.status < 300) return body;
      const ra = resp.headers && resp.headers.get ? resp.headers.get('retry-after') : null;
      retryAfter = ra !== null && /^\d+$/.test(ra.trim()) ? Number(ra.trim()) : null;
      err = new BrokerError(resp.status, cleanText(body && body.error, 'http_error'),
        cleanText(body && body.message, 'no message'));
    } catch (e) {
      if (e instanceof BrokerError) throw e;
      err = transportError(e);
    }
    if (!retryable(err) || n >= attempts) throw err;
    const wait = delayMs(n - 1, opts.backoff, retryAfter);
    notice(`attempt ${n}/${attempts} failed (${err.code}); retrying in ${(wait / 1000).toFixed(1)}s`);
    await sleep(wait);
  }
}

/** The claims of a JWT, decoded WITHOUT verification (for explaining a refusal), or null. */
function unverifiedClaims(token) {
  try {
    const payload = String(token).split('.')[1];
    const obj = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
    return obj && typeof obj === 'object' && !Array.isArray(obj) ? obj : null;
  } catch {
    return null;
  }
}

const HINTS = {
  policy_denied: 'no policy rule allows this job the credential: compare the claims below with the rule\'s `when` (`broker policy explain --claims FILE` shows which conditions fail)',
  invalid_claim_value: 'a claim of this job cannot be used in the credential (see the claims below)',
  claims_too_large: 'the job token\'s claims are too large for the policy engine',
  bad_audience: 'the `audience` input must be the broker\'s configured audience',
  token_expired: 'the job token expired before it reached the broker: check the runner\'s clock and retry',
  token_too_old: 'the job token was issued too long ago: request it just before the exchange',
  token_not_yet_valid: 'the runner\'s and the broker\'s clocks disagree',
  token_replayed: 'each job token can be exchanged once: the action requests a fresh one per attempt; do not share tokens',
  unknown_issuer: 'the broker does not trust this token\'s issuer: check the broker\'s `issuers:`',
  unknown_key: 'the issuer\'s signing key is unknown to the broker: check the broker\'s `issuers:` URL',
  bad_signature: 'the token\'s signature does not verify against the issuer\'s keys',
  unsupported_algorithm: 'the token\'s algorithm is not allowed for its issuer',
  missing_claim: 'the token lacks a claim the broker requires',
  missing_token: 'no job token was sent: give the job `permissions: id-token: write`',
  malformed_token: 'the job token is not a JWT',
  invalid_revocation_token: 'the revocation token is wrong or belongs to no grant',
};

/** Lines explaining a refusal: a hint and the (non-secret) claims the policy saw. */
function explainRefusal(err, claims) {
  const lines = [];
  if (HINTS[err.code]) lines.push(`hint: ${HINTS[err.code]}`);
  if (claims) {
    lines.push('claims the broker saw (unverified copy of the job token\'s claims):');
    for (const k of Object.keys(claims).sort()) lines.push(`  ${k}: ${JSON.stringify(claims[k])}`);
  }
  return lines;
}

const NO_ID_TOKEN_HELP = 'ACTIONS_ID_TOKEN_REQUEST_URL is not set, so this job cannot request an OIDC token: '
  + 'add `permissions: id-token: write` to the job (or workflow). Pull requests from forks never get one.';

module.exports = {
  parseAttempts,
  PUBLIC_FIELDS, envStem, parseCredentials, parseBool, parseGrant, secretValues, envVars, awsProfiles,
  accountOfArn, sslModeOf, outputs, parseSshKeys, sshFiles,
  BrokerError, NetworkError, TlsError, transportError, retryable, delayMs, postWithRetries, unverifiedClaims, explainRefusal,
  NO_ID_TOKEN_HELP,
};
