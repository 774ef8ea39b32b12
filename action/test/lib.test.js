'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const lib = require('../src/lib');

const answer = () => ({
  grant_id: 'g-1',
  expires_at: '2030-01-01T00:00:00Z',
  revocation_token: 'brk_rvk_SECRET_R',
  credentials: {
    'deploy-api': { kind: 'api_token', token: 'SECRET_T', token_type: 'Bearer', scope: 'deploy:x', expires_at: 'e' },
    db: { kind: 'postgres', url: 'postgres://u:SECRET_P@h/d', username: 'u', password: 'SECRET_P' },
    aws: { kind: 'aws_sts', access_key_id: 'AKIA', secret_access_key: 'SECRET_A', session_token: 'SECRET_S', region: 'eu-west-1' },
    thing: { kind: 'vault', secret_id: 'SECRET_V', lease: 60 },
  },
});

test('parseCredentials: commas, newlines, comments and custom variable names', () => {
  assert.deepEqual(lib.parseCredentials('a, b=MY_VAR\n# c\n\nd'), [
    { name: 'a', envName: null }, { name: 'b', envName: 'MY_VAR' }, { name: 'd', envName: null },
  ]);
  assert.throws(() => lib.parseCredentials(''), /at least one/);
  assert.throws(() => lib.parseCredentials('a=1BAD'), /not a valid environment variable/);
  assert.throws(() => lib.parseCredentials('=X'), /empty name/);
});

test('parseAttempts: empty is 5; 0, negatives and non-numbers are refused, not replaced', () => {
  assert.equal(lib.parseAttempts(''), 5);
  assert.equal(lib.parseAttempts(' 1 '), 1);
  assert.equal(lib.parseAttempts('12'), 12);
  for (const bad of ['0', '-1', '2.5', 'five', '1e3', '101']) {
    assert.throws(() => lib.parseAttempts(bad), /attempts must be a whole number/, bad);
  }
});

test('parseBool accepts the runner forms and rejects others', () => {
  assert.equal(lib.parseBool('', true), true);
  assert.equal(lib.parseBool('False', true), false);
  assert.equal(lib.parseBool('yes', false), true);
  assert.throws(() => lib.parseBool('maybe', false));
});

test('every field not on the public list is secret, including unknown kinds', () => {
  const g = lib.parseGrant(answer());
  const secrets = lib.secretValues(g);
  for (const s of ['brk_rvk_SECRET_R', 'SECRET_T', 'postgres://u:SECRET_P@h/d', 'SECRET_P', 'SECRET_A', 'SECRET_S', 'SECRET_V', 'AKIA', '60']) {
    assert.ok(secrets.includes(s), s);
  }
  for (const p of ['Bearer', 'deploy:x', 'u', 'eu-west-1']) assert.ok(!secrets.includes(p), p);
  assert.throws(() => lib.parseGrant({ grant_id: 'x' }), /expires_at/);
});

test('environment variables per credential kind', () => {
  const g = lib.parseGrant(answer());
  const vars = Object.fromEntries(lib.envVars(g, []).map((v) => [v.name, v]));
  assert.equal(vars.DEPLOY_API_TOKEN.value, 'SECRET_T');
  assert.equal(vars.DATABASE_URL.value, 'postgres://u:SECRET_P@h/d');
  assert.equal(vars.PGUSER.secret, false);
  assert.equal(vars.AWS_SECRET_ACCESS_KEY.value, 'SECRET_A');
  assert.equal(vars.AWS_SESSION_TOKEN.secret, true);
  assert.equal(vars.AWS_REGION.value, 'eu-west-1');
  assert.equal(vars.AWS_DEFAULT_REGION.value, 'eu-west-1');
  assert.equal(vars.THING_SECRET_ID.value, 'SECRET_V');
  assert.equal(vars.THING_LEASE.value, '60');
  const custom = lib.envVars(g, [{ name: 'deploy-api', envName: 'API_TOKEN' }, { name: 'db', envName: 'PRIMARY_DB' }]);
  const names = custom.map((v) => v.name);
  assert.ok(names.includes('API_TOKEN') && !names.includes('DEPLOY_API_TOKEN'));
  assert.ok(names.includes('PRIMARY_DB') && !names.includes('DATABASE_URL'));
  assert.ok(names.includes('PGUSER'), 'the override renames DATABASE_URL only');
  assert.equal(lib.envStem('9-lives.x'), '_9_LIVES_X');
});

// What the postgres provider returns (broker/src/providers/postgres/provider.rs).
const pg = (user, pw, mode = 'require') => ({
  kind: 'postgres', host: 'db.internal', port: 5432, database: 'app', username: user,
  password: pw, expires_at: '2030-01-01T00:00:00Z',
  database_url: `postgresql://${user}:${pw}@db.internal:5432/app?sslmode=${mode}`,
});
// What the aws_sts provider returns (broker/src/providers/aws_sts/provider.rs), plus an ARN.
const aws = (key, region, extra = {}) => ({
  kind: 'aws_sts', access_key_id: `AKIA${key}`, secret_access_key: `SECRET_${key}`,
  session_token: `SESSION_${key}`, expiration: '2030-01-01T00:15:00Z', region, ...extra,
});
const grantOf = (credentials) => lib.parseGrant({ grant_id: 'g', expires_at: 'e', revocation_token: 'r', credentials });

test('one postgres credential: the plain PG* names, PGSSLMODE from the URL, DATABASE_URL', () => {
  const vars = lib.envVars(grantOf({ db: pg('brk_u', 'PW1', 'verify-full') }), []);
  const by = Object.fromEntries(vars.map((v) => [v.name, v]));
  assert.deepEqual(vars.map((v) => v.name).sort(),
    ['DATABASE_URL', 'PGDATABASE', 'PGHOST', 'PGPASSWORD', 'PGPORT', 'PGSSLMODE', 'PGUSER']);
  assert.deepEqual([by.PGHOST.value, by.PGPORT.value, by.PGDATABASE.value, by.PGUSER.value],
    ['db.internal', '5432', 'app', 'brk_u']);
  assert.equal(by.PGSSLMODE.value, 'verify-full');
  assert.equal(by.PGSSLMODE.secret, false);
  assert.equal(by.PGPASSWORD.secret, true);
  assert.equal(by.DATABASE_URL.secret, true);
  assert.equal(by.DATABASE_URL.value, 'postgresql://brk_u:PW1@db.internal:5432/app?sslmode=verify-full');
});

test('several postgres credentials: every one prefixed <NAME>_, none plain; override renames its URL', () => {
  const g = grantOf({ 'analytics-db': pg('brk_a', 'PWA'), main: pg('brk_m', 'PWM', 'disable') });
  const vars = lib.envVars(g, [{ name: 'main', envName: 'MAIN_URL' }]);
  const by = Object.fromEntries(vars.map((v) => [v.name, v.value]));
  assert.equal(by.ANALYTICS_DB_PGUSER, 'brk_a');
  assert.equal(by.ANALYTICS_DB_PGPASSWORD, 'PWA');
  assert.equal(by.ANALYTICS_DB_PGSSLMODE, 'require');
  assert.match(by.ANALYTICS_DB_DATABASE_URL, /brk_a:PWA/);
  assert.equal(by.MAIN_PGUSER, 'brk_m');
  assert.equal(by.MAIN_PGSSLMODE, 'disable');
  assert.match(by.MAIN_URL, /brk_m:PWM/);
  assert.equal(by.MAIN_DATABASE_URL, undefined);
  for (const plain of ['PGUSER', 'PGPASSWORD', 'PGHOST', 'DATABASE_URL', 'PGSSLMODE']) assert.equal(by[plain], undefined, plain);
  // Names are unique.
  assert.equal(new Set(vars.map((v) => v.name)).size, vars.length);
});

test('a variable two credentials would set is refused, not shadowed', () => {
  const g = grantOf({ db: pg('brk_u', 'PW1'), 'deploy-api': { kind: 'api_token', token: 'T' } });
  assert.throws(() => lib.envVars(g, [{ name: 'deploy-api', envName: 'PGPASSWORD' }]), /two credentials would set PGPASSWORD/);
  const same = grantOf({ 'a-b': { kind: 'api_token', token: 'T1' }, a_b: { kind: 'api_token', token: 'T2' } });
  assert.throws(() => lib.envVars(same, []), /two credentials would set A_B_TOKEN/);
});

test('one aws_sts credential: AWS_*, the expiration public, the account from an ARN', () => {
  const g = grantOf({ deploy: aws('ONE', 'eu-west-1', { role_arn: 'arn:aws:iam::123456789012:role/deploy' }) });
  const vars = lib.envVars(g, []);
  const by = Object.fromEntries(vars.map((v) => [v.name, v]));
  assert.equal(by.AWS_ACCESS_KEY_ID.value, 'AKIAONE');
  assert.equal(by.AWS_SECRET_ACCESS_KEY.secret, true);
  assert.equal(by.AWS_SESSION_TOKEN.value, 'SESSION_ONE');
  assert.equal(by.AWS_REGION.value, 'eu-west-1');
  assert.equal(by.AWS_DEFAULT_REGION.value, 'eu-west-1');
  assert.equal(by.AWS_CREDENTIAL_EXPIRATION.value, '2030-01-01T00:15:00Z');
  assert.equal(by.AWS_CREDENTIAL_EXPIRATION.secret, false);
  assert.equal(by.AWS_ACCOUNT_ID.value, '123456789012');
  assert.ok(!lib.secretValues(g).includes('2030-01-01T00:15:00Z'), 'the expiration is never masked');
  assert.equal(lib.awsProfiles(g), null, 'one credential: no profile files');
  // Without an account id or ARN in the answer: no AWS_ACCOUNT_ID (never guessed).
  const bare = lib.envVars(grantOf({ deploy: aws('ONE', 'eu-west-1') }), []).map((v) => v.name);
  assert.ok(!bare.includes('AWS_ACCOUNT_ID'));
  const byId = lib.envVars(grantOf({ deploy: aws('ONE', 'r', { account_id: '210987654321' }) }), []);
  assert.equal(byId.find((v) => v.name === 'AWS_ACCOUNT_ID').value, '210987654321');
  assert.equal(lib.accountOfArn('arn:aws:sts::123456789012:assumed-role/r/s'), '123456789012');
  assert.equal(lib.accountOfArn('not-an-arn'), null);
});

test('several aws_sts credentials: no plain AWS_* at all, one named profile each', () => {
  const g = grantOf({ prod: aws('PROD', 'eu-west-1'), 'audit.logs': aws('AUD', 'us-east-1') });
  const vars = lib.envVars(g, []);
  assert.deepEqual(vars.filter((v) => v.name.startsWith('AWS_')), []);
  const p = lib.awsProfiles(g);
  assert.deepEqual(p.profiles, ['prod', 'audit.logs']);
  assert.equal(p.credentials, '[prod]\naws_access_key_id = AKIAPROD\naws_secret_access_key = SECRET_PROD\n'
    + 'aws_session_token = SESSION_PROD\n\n[audit.logs]\naws_access_key_id = AKIAAUD\n'
    + 'aws_secret_access_key = SECRET_AUD\naws_session_token = SESSION_AUD\n\n');
  assert.equal(p.config, '[profile prod]\nregion = eu-west-1\n\n[profile audit.logs]\nregion = us-east-1\n\n');
  // A name that could break the INI files is refused, not written.
  assert.throws(() => lib.awsProfiles(grantOf({ 'a]\n[x': aws('A', 'r'), b: aws('B', 'r') })), /cannot name an AWS profile/);
  assert.throws(() => lib.awsProfiles(grantOf({ a: aws('A\nx', 'r'), b: aws('B', 'r') })), /spans lines/);
});

test('PGSSLMODE only from a well-formed URL', () => {
  assert.equal(lib.sslModeOf('postgresql://u:p@h/d?sslmode=require'), 'require');
  assert.equal(lib.sslModeOf('postgresql://u:p@h/d'), null);
  assert.equal(lib.sslModeOf('::'), null);
});

test('transport errors: TLS trust failures are final and say what to do; others are retried', () => {
  const wrap = (code, via) => Object.assign(new TypeError('fetch failed'), { cause: Object.assign(new Error('x'), { code }), via });
  const tls = lib.transportError(wrap('SELF_SIGNED_CERT_IN_CHAIN', null));
  assert.ok(tls instanceof lib.TlsError);
  assert.match(tls.message, /not trusted \(SELF_SIGNED_CERT_IN_CHAIN\).*ca-certificate/);
  assert.equal(lib.retryable(tls), false);
  const refused = lib.transportError(wrap('ECONNREFUSED', 'proxy.internal:3128'));
  assert.ok(refused instanceof lib.NetworkError);
  assert.match(refused.message, /connection failed \(ECONNREFUSED\) through the proxy proxy.internal:3128/);
  assert.equal(lib.retryable(refused), true);
  assert.match(lib.transportError(Object.assign(new Error('t'), { name: 'TimeoutError' })).message, /timed out/);
});

test('outputs name every field as <credential>-<field>', () => {
  const o = Object.fromEntries(lib.outputs(lib.parseGrant(answer())).map((x) => [x.name, x]));
  assert.equal(o['grant-id'].value, 'g-1');
  assert.equal(o['deploy-api-token'].value, 'SECRET_T');
  assert.equal(o['deploy-api-token'].secret, true);
  assert.equal(o['aws-secret-access-key'].value, 'SECRET_A');
});

test('backoff grows, is capped and honours Retry-After (capped at 30 s)', () => {
  const opts = { baseMs: 100, maxMs: 400 };
  assert.equal(lib.delayMs(0, opts, null, () => 0), 100);
  assert.equal(lib.delayMs(1, opts, null, () => 0), 200);
  assert.equal(lib.delayMs(9, opts, null, () => 0), 400);
  assert.ok(lib.delayMs(9, opts, null, () => 0.999) <= 500);
  assert.equal(lib.delayMs(0, opts, 3, () => 0), 3000);
  assert.equal(lib.delayMs(0, opts, 3600, () => 0), 30_000);
});

function fakeFetch(script) {
  const calls = [];
  const f = async (url, init) => {
    calls.push({ url, init });
    const step = script[Math.min(calls.length - 1, script.length - 1)];
    if (step === 'network') throw new TypeError('fetch failed');
    return {
      status: step.status,
      headers: new Headers(step.headers || {}),
      json: async () => step.body,
    };
  };
  f.calls = calls;
  return f;
}

const fast = (fetch, extra = {}) => ({ fetch, sleep: async () => {}, attempts: 4, ...extra });

test('retries network errors, 5xx and 429 with a fresh request each time', async () => {
  const fetch = fakeFetch(['network', { status: 503, body: { error: 'store_unavailable' } },
    { status: 429, headers: { 'retry-after': '1' }, body: {} }, { status: 200, body: { ok: 1 } }]);
  let made = 0;
  const notes = [];
  const r = await lib.postWithRetries(async () => ({ url: `u${++made}`, headers: {} }), fast(fetch, { notice: (m) => notes.push(m) }));
  assert.deepEqual(r, { ok: 1 });
  assert.equal(fetch.calls.length, 4);
  assert.deepEqual(fetch.calls.map((c) => c.url), ['u1', 'u2', 'u3', 'u4']);
  assert.equal(notes.length, 3);
  assert.match(notes[1], /store_unavailable/);
});

test('never retries 401 or 403 and keeps the broker reason code', async () => {
  for (const status of [400, 401, 403]) {
    const fetch = fakeFetch([{ status, body: { error: 'policy_denied', message: 'credential "x" is not allowed' } }]);
    await assert.rejects(lib.postWithRetries(async () => ({ url: 'u' }), fast(fetch)), (e) => {
      assert.equal(e.code, 'policy_denied');
      assert.equal(e.status, status);
      assert.equal(e.refusal, status !== 400);
      return true;
    });
    assert.equal(fetch.calls.length, 1);
  }
});

test('a 500 store_rejected is final: the same request would fail the same way', async () => {
  const fetch = fakeFetch([{ status: 500, body: { error: 'store_rejected', message: 'refused' } }, { status: 200, body: { ok: 1 } }]);
  await assert.rejects(lib.postWithRetries(async () => ({ url: 'u' }), fast(fetch)), (e) => {
    assert.equal(e.code, 'store_rejected');
    assert.equal(e.status, 500);
    return true;
  });
  assert.equal(fetch.calls.length, 1);
  assert.equal(lib.retryable(new lib.BrokerError(500, 'internal', 'x')), true);
  assert.equal(lib.retryable(new lib.BrokerError(503, 'store_unavailable', 'x')), true);
});

test('gives up after the last attempt', async () => {
  const fetch = fakeFetch([{ status: 502, body: null }]);
  await assert.rejects(lib.postWithRetries(async () => ({ url: 'u' }), fast(fetch)), /502 http_error/);
  assert.equal(fetch.calls.length, 4);
});

test('refusals are explained with the claims the policy saw', () => {
  const payload = Buffer.from(JSON.stringify({ repository: 'acme/api', ref: 'refs/heads/feature' })).toString('base64url');
  const claims = lib.unverifiedClaims(`h.${payload}.SIGNATURE`);
  const lines = lib.explainRefusal(new lib.BrokerError(403, 'policy_denied', 'no'), claims).join('\n');
  assert.match(lines, /policy explain/);
  assert.match(lines, /refs\/heads\/feature/);
  assert.doesNotMatch(lines, /SIGNATURE/);
  assert.equal(lib.unverifiedClaims('not-a-jwt'), null);
});

test('ssh_cert and github_app: certificate public, keys and tokens secret, GH_TOKEN, no key in env', () => {
  const g = lib.parseGrant({
    grant_id: 'g', expires_at: 'e', revocation_token: 'brk_rvk_SECRET_R',
    credentials: {
      'deploy-ssh': {
        kind: 'ssh_cert', certificate: 'ssh-ed25519-cert-v01@openssh.com AAAA', public_key: 'ssh-ed25519 AAAA',
        private_key: '-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETLINE_ONE_XXXX\nSECRETLINE_TWO_YYYY\n-----END OPENSSH PRIVATE KEY-----\n',
        serial: '123', key_id: 'broker grant=g', principals: ['deploy'],
      },
      release: { kind: 'github_app', token: 'ghs_SECRET_G', repositories: ['api'], permissions: { contents: 'read' } },
    },
  });
  const ssh = g.credentials.find((c) => c.name === 'deploy-ssh');
  assert.equal(ssh.fields.certificate.secret, false);
  assert.equal(ssh.fields.private_key.secret, true);
  const secrets = lib.secretValues(g);
  assert.ok(secrets.includes('ghs_SECRET_G'));
  assert.ok(secrets.includes('SECRETLINE_ONE_XXXX') && secrets.includes('SECRETLINE_TWO_YYYY'), 'each key line masked');
  const vars = lib.envVars(g, [{ name: 'deploy-ssh' }, { name: 'release' }]);
  assert.deepEqual(vars.find((v) => v.name === 'GH_TOKEN'), { name: 'GH_TOKEN', value: 'ghs_SECRET_G', secret: true });
  assert.ok(!vars.some((v) => /SECRETLINE/.test(v.value)), 'no private key in the environment');
  const renamed = lib.envVars(g, [{ name: 'release', envName: 'GITHUB_TOKEN' }]);
  assert.ok(renamed.some((v) => v.name === 'GITHUB_TOKEN'));
  const files = lib.sshFiles(g, {});
  assert.equal(files.length, 1);
  assert.match(files[0].identity, /SECRETLINE_ONE/);
  assert.equal(files[0].certificate, 'ssh-ed25519-cert-v01@openssh.com AAAA\n');
  assert.equal(lib.sshFiles(g, { 'deploy-ssh': 'LOCAL' })[0].identity, 'LOCAL', 'the runner key wins');
  assert.deepEqual(lib.parseSshKeys('deploy-ssh, deploy-ssh', [{ name: 'deploy-ssh' }]), ['deploy-ssh']);
  assert.throws(() => lib.parseSshKeys('other', [{ name: 'deploy-ssh' }]), /not in credentials/);
});

test('ed25519KeyPair: OpenSSH reads the private key and derives the same public key', (t) => {
  const { execFileSync } = require('node:child_process');
  const fs = require('node:fs');
  const os = require('node:os');
  const path = require('node:path');
  const { ed25519KeyPair } = require('../src/ssh');
  try { execFileSync('ssh-keygen', ['-?'], { stdio: 'ignore' }); } catch (e) {
    if (e.code === 'ENOENT') { t.skip('ssh-keygen is not installed'); return; }
  }
  const pair = ed25519KeyPair('test-comment');
  assert.match(pair.publicLine, /^ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI[A-Za-z0-9+/=]+ test-comment$/);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ssh-test-'));
  const key = path.join(dir, 'id');
  fs.writeFileSync(key, pair.privateKey, { mode: 0o600 });
  const derived = execFileSync('ssh-keygen', ['-y', '-f', key], { encoding: 'utf8' }).trim();
  assert.equal(derived.split(' ').slice(0, 2).join(' '), pair.publicLine.split(' ').slice(0, 2).join(' '));
  assert.notEqual(ed25519KeyPair().publicLine, pair.publicLine, 'a fresh pair each time');
  fs.rmSync(dir, { recursive: true, force: true });
});
