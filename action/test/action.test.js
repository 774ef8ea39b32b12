'use strict';
// The bundled action (dist/) run as the runner runs it (harness/runner.js), against local
// stand-ins: a token endpoint playing the runner's ACTIONS_ID_TOKEN_REQUEST_URL, and a fake
// broker scripted per test. The real broker is exercised by integration/tests/suite/pipelines.rs.
const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { runStep, leaks, masked, actionNode, declaredNodeMajor } = require('../harness/runner');
const { proxy, makeCa, tlsFront } = require('../harness/netfixtures');

function serve(handler) {
  return new Promise((resolve) => {
    const calls = [];
    const srv = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c) => { body += c; });
      req.on('end', () => {
        calls.push({ method: req.method, url: req.url, headers: req.headers, body });
        const [status, json, headers] = handler(req, calls.length, body);
        res.writeHead(status, { 'content-type': 'application/json', ...(headers || {}) });
        res.end(JSON.stringify(json));
      });
    });
    srv.listen(0, '127.0.0.1', () => resolve({
      url: `http://127.0.0.1:${srv.address().port}`,
      port: srv.address().port,
      calls,
      close: () => { srv.closeAllConnections(); srv.close(); },
    }));
  });
}

const jwt = (claims) => `eyJhbGciOiJSUzI1NiJ9.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.SIGNATURE_PART`;

async function tokenEndpoint() {
  return serve((req, n) => {
    const aud = new URL(req.url, 'http://x').searchParams.get('audience');
    return [200, { value: jwt({ aud, repository: 'acme/api', ref: 'refs/heads/feature', n }) }];
  });
}

const GRANT = {
  grant_id: 'grant-42',
  expires_at: '2030-01-01T00:00:00Z',
  revocation_token: 'brk_rvk_REVOKE_SECRET',
  credentials: {
    'deploy-api': { kind: 'api_token', token: 'API_TOKEN_SECRET', token_type: 'Bearer', expires_at: '2030-01-01T00:00:00Z' },
    db: { kind: 'postgres', url: 'postgres://u:PG_SECRET@127.0.0.1/db', username: 'u', password: 'PG_SECRET' },
  },
};
const SECRETS = ['brk_rvk_REVOKE_SECRET', 'API_TOKEN_SECRET', 'PG_SECRET', 'SIGNATURE_PART'];

function env(tokens) {
  return { ACTIONS_ID_TOKEN_REQUEST_URL: `${tokens.url}/token?api-version=2.0`, ACTIONS_ID_TOKEN_REQUEST_TOKEN: 'runner-bearer' };
}

test('main masks first, exports outputs/env/state; post revokes', async (t) => {
  const tokens = await tokenEndpoint();
  const broker = await serve((req) => (req.url === '/v1/exchange' ? [200, GRANT] : [200, { grant_id: 'grant-42', status: 'revoked' }]));
  t.after(() => { tokens.close(); broker.close(); });
  const inputs = { 'broker-url': `${broker.url}/`, credentials: 'deploy-api\ndb', audience: 'https://broker.test', ttl: '5m', 'export-env': 'true' };
  const main = await runStep('main', { inputs, env: env(tokens) });
  assert.equal(main.code, 0, main.stdout + main.stderr);
  // The audience reached the token endpoint; the runner's bearer was used.
  assert.match(tokens.calls[0].url, /audience=https%3A%2F%2Fbroker.test/);
  assert.equal(tokens.calls[0].headers.authorization, 'Bearer runner-bearer');
  const ex = broker.calls[0];
  assert.deepEqual(JSON.parse(ex.body), { credentials: ['deploy-api', 'db'], ttl: '5m' });
  assert.match(ex.headers.authorization, /^Bearer eyJ/);
  // Masks come before any other line.
  // (The runner's own ::debug:: line about the token URL carries no secret.)
  const lines = main.stdout.split('\n').filter((l) => l && !l.startsWith('::debug::'));
  const firstOther = lines.findIndex((l) => !l.startsWith('::add-mask::'));
  const lastMask = lines.map((l) => l.startsWith('::add-mask::')).lastIndexOf(true);
  assert.ok(lastMask < firstOther || firstOther === -1, main.stdout);
  for (const s of ['brk_rvk_REVOKE_SECRET', 'API_TOKEN_SECRET', 'PG_SECRET', 'postgres://u:PG_SECRET@127.0.0.1/db']) {
    assert.ok(masked(main).includes(s), s);
  }
  assert.deepEqual(leaks(main, SECRETS), []);
  assert.equal(main.outputs['deploy-api-token'], 'API_TOKEN_SECRET');
  assert.equal(main.outputs['grant-id'], 'grant-42');
  assert.equal(main.env.DEPLOY_API_TOKEN, 'API_TOKEN_SECRET');
  assert.equal(main.env.DATABASE_URL, 'postgres://u:PG_SECRET@127.0.0.1/db');
  assert.equal(main.state['revocation-token'], 'brk_rvk_REVOKE_SECRET');

  const post = await runStep('post', { inputs, state: main.state });
  assert.equal(post.code, 0, post.stdout + post.stderr);
  const rv = broker.calls[1];
  assert.equal(rv.url, '/v1/revoke');
  assert.equal(rv.headers.authorization, 'Bearer brk_rvk_REVOKE_SECRET');
  assert.match(post.stdout, /grant grant-42 revoked/);
  assert.deepEqual(leaks(post, SECRETS), []);
});

test('a 403 fails at once with the reason code and the claims, never retried', async (t) => {
  const tokens = await tokenEndpoint();
  const broker = await serve(() => [403, { error: 'policy_denied', message: 'credential "deploy-api" is not allowed for this job' }]);
  t.after(() => { tokens.close(); broker.close(); });
  const main = await runStep('main', { inputs: { 'broker-url': broker.url, credentials: 'deploy-api', attempts: '5' }, env: env(tokens) });
  assert.equal(main.code, 1);
  assert.equal(broker.calls.length, 1);
  assert.match(main.stdout, /::error::the broker refused \(403 policy_denied\)/);
  assert.match(main.stdout, /ref: "refs\/heads\/feature"/);
  assert.match(main.stdout, /broker policy explain/);
  assert.deepEqual(leaks(main, SECRETS), []);
  assert.equal(main.state['revocation-token'], undefined);
  // Nothing to revoke: post is quiet and succeeds.
  const post = await runStep('post', { inputs: {}, state: main.state });
  assert.equal(post.code, 0);
  assert.match(post.stdout, /nothing to revoke/);
});

test('5xx and 429 are retried, each attempt with a fresh job token', async (t) => {
  const tokens = await tokenEndpoint();
  const broker = await serve((req, n) => (n === 1 ? [503, { error: 'store_unavailable', message: 'm' }]
    : n === 2 ? [429, { error: 'rate_limited', message: 'm' }, { 'retry-after': '0' }] : [200, GRANT]));
  t.after(() => { tokens.close(); broker.close(); });
  const main = await runStep('main', { inputs: { 'broker-url': broker.url, credentials: 'deploy-api' }, env: env(tokens) });
  assert.equal(main.code, 0, main.stdout);
  assert.equal(broker.calls.length, 3);
  assert.equal(tokens.calls.length, 3);
  const auths = new Set(broker.calls.map((c) => c.headers.authorization));
  assert.equal(auths.size, 3);
  // Without export-env only the (non-secret) grant id is exported.
  assert.deepEqual(main.env, { BROKER_GRANT_ID: 'grant-42' });
  assert.match(main.stdout, /attempt 1\/5 failed \(store_unavailable\)/);
});

test('without id-token permission the error says how to fix it', async () => {
  const main = await runStep('main', { inputs: { 'broker-url': 'http://127.0.0.1:9', credentials: 'x' }, env: {} });
  assert.equal(main.code, 1);
  assert.match(main.stdout, /permissions: id-token: write/);
});

test('a failed revoke is a warning by default and an error when asked', async (t) => {
  const broker = await serve(() => [401, { error: 'invalid_revocation_token', message: 'the revocation token is not valid' }]);
  t.after(() => broker.close());
  const state = { 'revocation-token': 'brk_rvk_REVOKE_SECRET', 'broker-url': broker.url, 'grant-id': 'g' };
  const soft = await runStep('post', { inputs: {}, state });
  assert.equal(soft.code, 0);
  assert.match(soft.stdout, /::warning::revoking grant g failed: the broker refused \(401 invalid_revocation_token\)/);
  const strict = await runStep('post', { inputs: { 'fail-on-revoke-error': 'true' }, state });
  assert.equal(strict.code, 1);
  assert.match(strict.stdout, /::error::revoking grant g failed/);
  assert.deepEqual(leaks(strict, SECRETS), []);
  assert.equal(broker.calls.length, 2);
});

test('the harness runs dist/ with the node that action.yml declares', () => {
  const declared = declaredNodeMajor();
  assert.equal(declared, 24, 'runs.using: node24');
  const v = execFileSync(actionNode(), ['--version'], { encoding: 'utf8' }).trim();
  assert.equal(Number(v.replace(/^v/, '').split('.')[0]), declared,
    `the action's runtime is node ${declared}, the harness has ${v} (run npm ci in action/)`);
});

const okBroker = (req) => (req.url === '/v1/exchange' ? [200, GRANT] : [200, { grant_id: 'grant-42', status: 'revoked' }]);

test('with HTTPS_PROXY/HTTP_PROXY the broker is reached only through the proxy; NO_PROXY bypasses it', async (t) => {
  const tokens = await tokenEndpoint();
  const broker = await serve(okBroker);
  const px = await proxy();
  t.after(() => { tokens.close(); broker.close(); px.close(); });
  // broker.test resolves nowhere: only the proxy can reach it. The proxy URL carries a password,
  // which must reach the proxy as Proxy-Authorization and never the log.
  const proxyUrl = px.url.replace('http://', 'http://ci:PROXY_PASSWORD@');
  const inputs = { 'broker-url': `http://broker.test:${broker.port}`, credentials: 'deploy-api', 'export-env': 'true' };
  const penv = { ...env(tokens), HTTP_PROXY: proxyUrl, HTTPS_PROXY: proxyUrl };
  const main = await runStep('main', { inputs, env: penv });
  assert.equal(main.code, 0, main.stdout + main.stderr);
  assert.equal(main.env.DEPLOY_API_TOKEN, 'API_TOKEN_SECRET');
  const post = await runStep('post', { inputs, env: penv, state: main.state });
  assert.equal(post.code, 0, post.stdout + post.stderr);
  assert.deepEqual(broker.calls.map((c) => c.url), ['/v1/exchange', '/v1/revoke']);
  // Both calls went through the proxy, tunnelled to the broker's name; the token endpoint
  // (loopback) was not proxied.
  assert.deepEqual(px.tunnels.map((x) => `${x.host}:${x.port}`), [`broker.test:${broker.port}`, `broker.test:${broker.port}`]);
  assert.equal(px.tunnels[0].auth, `Basic ${Buffer.from('ci:PROXY_PASSWORD').toString('base64')}`);
  assert.deepEqual(px.refused, []);
  assert.equal(tokens.calls.length, 1);
  for (const step of [main, post]) assert.deepEqual(leaks(step, [...SECRETS, 'PROXY_PASSWORD']), []);

  // NO_PROXY names the broker: the action connects directly, the proxy sees nothing.
  // (0.0.0.0 reaches this machine's 127.0.0.1 listener and, unlike 127.x, is not loopback to
  // the proxy rules, so only NO_PROXY keeps it off the proxy.)
  const before = { tunnels: px.tunnels.length, calls: broker.calls.length };
  const direct = await runStep('main', {
    inputs: { ...inputs, 'broker-url': `http://0.0.0.0:${broker.port}` },
    env: { ...penv, NO_PROXY: 'example.com,0.0.0.0' },
  });
  assert.equal(direct.code, 0, direct.stdout + direct.stderr);
  assert.equal(broker.calls.length, before.calls + 1);
  assert.equal(px.tunnels.length, before.tunnels, 'NO_PROXY kept the request off the proxy');
  // The same URL without NO_PROXY goes through the proxy (so the line above is not vacuous).
  const proxied = await runStep('main', { inputs: { ...inputs, 'broker-url': `http://0.0.0.0:${broker.port}` }, env: penv });
  assert.equal(proxied.code, 0, proxied.stdout + proxied.stderr);
  assert.equal(px.tunnels.length, before.tunnels + 1);

  // A proxy that is down: a network error naming the proxy (no password), retried, then final.
  const down = await runStep('main', {
    inputs: { ...inputs, attempts: '2' },
    env: { ...penv, HTTP_PROXY: 'http://ci:PROXY_PASSWORD@127.0.0.1:9' },
  });
  assert.equal(down.code, 1);
  assert.match(down.stdout, /::error::cannot reach the broker: connection failed \(ECONNREFUSED\) through the proxy 127\.0\.0\.1:9/);
  assert.deepEqual(leaks(down, ['PROXY_PASSWORD']), []);
});

test('a TLS broker under a private CA: trusted with ca-certificate, refused clearly without', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'broker-action-ca-'));
  const pki = makeCa(dir, 'private');
  const other = makeCa(dir, 'other');
  const tokens = await tokenEndpoint();
  // The fake broker speaks plain HTTP behind a TLS-terminating forwarder (as the real one does
  // in pipelines.rs), with a certificate from the private CA.
  const broker = await serve(okBroker);
  const front = await tlsFront(broker.port, pki);
  const tlsUrl = `https://127.0.0.1:${front.port}`;
  const px = await proxy();
  t.after(() => { tokens.close(); broker.close(); front.close(); px.close(); fs.rmSync(dir, { recursive: true, force: true }); });
  const base = { credentials: 'deploy-api', 'export-env': 'true', attempts: '3' };

  // Trusted: the CA as PEM text, the broker by name through the proxy (TLS inside the tunnel).
  const viaProxy = { ...env(tokens), HTTPS_PROXY: px.url };
  const inputs = { ...base, 'broker-url': `https://broker.test:${front.port}`, 'ca-certificate': pki.ca };
  const main = await runStep('main', { inputs, env: viaProxy });
  assert.equal(main.code, 0, main.stdout + main.stderr);
  assert.equal(main.env.DEPLOY_API_TOKEN, 'API_TOKEN_SECRET');
  const post = await runStep('post', { inputs, env: viaProxy, state: main.state });
  assert.equal(post.code, 0, post.stdout + post.stderr);
  assert.match(post.stdout, /grant grant-42 revoked/);
  assert.equal(px.tunnels.length, 2);
  assert.deepEqual(broker.calls.map((c) => c.url), ['/v1/exchange', '/v1/revoke']);

  // Trusted: the CA as a file path, direct to 127.0.0.1.
  const direct = await runStep('main', { inputs: { ...base, 'broker-url': tlsUrl, 'ca-certificate': pki.caPath }, env: env(tokens) });
  assert.equal(direct.code, 0, direct.stdout + direct.stderr);
  assert.equal(broker.calls.length, 3);

  // Not trusted: without ca-certificate (system roots), and with another CA. Final at once
  // (no retry), a clear message, nothing reached the broker's handler.
  for (const ca of ['', other.ca]) {
    const r = await runStep('main', { inputs: { ...base, 'broker-url': tlsUrl, 'ca-certificate': ca }, env: env(tokens) });
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stdout, /::error::the broker's TLS certificate is not trusted \([A-Z_]+\).*`ca-certificate`/);
    assert.doesNotMatch(r.stdout, /attempt 1\/3 failed/);
    assert.equal(r.state['revocation-token'], undefined);
  }
  assert.equal(broker.calls.length, 3);

  // A ca-certificate that is no certificate fails before any request.
  const bad = await runStep('main', { inputs: { ...base, 'broker-url': tlsUrl, 'ca-certificate': '-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----' }, env: env(tokens) });
  assert.equal(bad.code, 1);
  assert.match(bad.stdout, /::error::ca-certificate: certificate 1 does not parse/);
  assert.equal(broker.calls.length, 3);
});

test('credential shapes in the job: postgres PG*, several aws_sts as profiles in 0600 files that post deletes', async (t) => {
  const tokens = await tokenEndpoint();
  const pgc = (u, pw) => ({ kind: 'postgres', host: 'db.internal', port: 5432, database: 'app', username: u, password: pw,
    expires_at: '2030-01-01T00:00:00Z', database_url: `postgresql://${u}:${pw}@db.internal:5432/app?sslmode=require` });
  const awsc = (k, region) => ({ kind: 'aws_sts', access_key_id: `AKIA${k}`, secret_access_key: `AWS_SECRET_${k}`,
    session_token: `AWS_SESSION_${k}`, expiration: '2030-01-01T00:15:00Z', region });
  const grant = { grant_id: 'grant-7', expires_at: '2030-01-01T00:00:00Z', revocation_token: 'brk_rvk_REVOKE_SECRET',
    credentials: { db: pgc('brk_a', 'PG_A_SECRET'), prod: awsc('PROD', 'eu-west-1'), audit: awsc('AUDIT', 'us-east-1') } };
  const broker = await serve((req) => (req.url === '/v1/exchange' ? [200, grant] : [200, { grant_id: 'grant-7', status: 'revoked' }]));
  t.after(() => { tokens.close(); broker.close(); });
  const inputs = { 'broker-url': broker.url, credentials: 'db, prod, audit', 'export-env': 'true' };
  const main = await runStep('main', { inputs, env: env(tokens) });
  assert.equal(main.code, 0, main.stdout + main.stderr);
  const e = main.env;
  assert.equal(e.BROKER_GRANT_ID, 'grant-7');
  assert.deepEqual([e.PGHOST, e.PGPORT, e.PGDATABASE, e.PGUSER, e.PGPASSWORD, e.PGSSLMODE],
    ['db.internal', '5432', 'app', 'brk_a', 'PG_A_SECRET', 'require']);
  assert.match(e.DATABASE_URL, /^postgresql:\/\/brk_a:PG_A_SECRET@/);
  assert.deepEqual(Object.keys(e).filter((k) => k.startsWith('AWS_')).sort(), ['AWS_CONFIG_FILE', 'AWS_SHARED_CREDENTIALS_FILE']);
  const credFile = e.AWS_SHARED_CREDENTIALS_FILE;
  assert.equal(fs.statSync(credFile).mode & 0o777, 0o600);
  assert.equal(fs.statSync(e.AWS_CONFIG_FILE).mode & 0o777, 0o600);
  assert.equal(fs.statSync(path.dirname(credFile)).mode & 0o777, 0o700);
  const creds = fs.readFileSync(credFile, 'utf8');
  assert.match(creds, /\[prod\]\naws_access_key_id = AKIAPROD\naws_secret_access_key = AWS_SECRET_PROD\naws_session_token = AWS_SESSION_PROD\n/);
  assert.match(creds, /\[audit\]\naws_access_key_id = AKIAAUDIT\n/);
  assert.match(fs.readFileSync(e.AWS_CONFIG_FILE, 'utf8'), /\[profile audit\]\nregion = us-east-1\n/);
  // The AWS expirations are outputs and are not masked; the secrets are.
  assert.equal(main.outputs['prod-expiration'], '2030-01-01T00:15:00Z');
  assert.ok(!masked(main).includes('2030-01-01T00:15:00Z'));
  for (const s of ['AWS_SECRET_PROD', 'AWS_SESSION_AUDIT', 'PG_A_SECRET']) assert.ok(masked(main).includes(s), s);
  assert.deepEqual(leaks(main, ['AWS_SECRET_PROD', 'AWS_SESSION_PROD', 'AWS_SECRET_AUDIT', 'AWS_SESSION_AUDIT', 'PG_A_SECRET', 'brk_rvk_REVOKE_SECRET']), []);

  const post = await runStep('post', { inputs, state: main.state });
  assert.equal(post.code, 0, post.stdout + post.stderr);
  assert.ok(!fs.existsSync(path.dirname(credFile)), 'post deleted the credential files');
});

test('ssh_cert: the key pair is made on the runner, only the public key is sent, key + certificate in 0600 files; github_app: GH_TOKEN', async (t) => {
  const tokens = await tokenEndpoint();
  let sentPublicKey = null;
  const broker = await serve((req, n, body) => {
    if (req.url !== '/v1/exchange') return [200, { grant_id: 'grant-9', status: 'revoked' }];
    const asked = JSON.parse(body);
    sentPublicKey = asked.parameters && asked.parameters['deploy-ssh'] && asked.parameters['deploy-ssh'].public_key;
    return [200, {
      grant_id: 'grant-9', expires_at: '2030-01-01T00:00:00Z', revocation_token: 'brk_rvk_REVOKE_SECRET',
      credentials: {
        'deploy-ssh': { kind: 'ssh_cert', certificate: `ssh-ed25519-cert-v01@openssh.com CERTDATA`, public_key: sentPublicKey, serial: '77', principals: ['deploy'] },
        'made-ssh': { kind: 'ssh_cert', certificate: 'ssh-ed25519-cert-v01@openssh.com CERT2', private_key: '-----BEGIN OPENSSH PRIVATE KEY-----\nBROKER_MADE_KEY_LINE\n-----END OPENSSH PRIVATE KEY-----\n', serial: '78' },
        release: { kind: 'github_app', token: 'ghs_APP_TOKEN_SECRET', repositories: ['api'], permissions: { contents: 'read' } },
      },
    }];
  });
  t.after(() => { tokens.close(); broker.close(); });
  const inputs = { 'broker-url': broker.url, credentials: 'deploy-ssh, made-ssh, release', 'ssh-keys': 'deploy-ssh', 'export-env': 'true' };
  const main = await runStep('main', { inputs, env: env(tokens) });
  assert.equal(main.code, 0, main.stdout + main.stderr);
  assert.match(sentPublicKey, /^ssh-ed25519 AAAA/);
  const exchange = broker.calls.find((c) => c.url === '/v1/exchange');
  assert.ok(!/PRIVATE KEY/.test(exchange.body), 'no private key is sent');
  assert.ok(!('made-ssh' in (JSON.parse(exchange.body).parameters || {})));
  const e = main.env;
  const key = e.DEPLOY_SSH_IDENTITY_FILE;
  const cert = e.DEPLOY_SSH_CERTIFICATE_FILE;
  assert.equal(main.outputs['deploy-ssh-identity-file'], key);
  assert.equal(main.outputs['deploy-ssh-certificate-file'], cert);
  for (const f of [key, cert, e.MADE_SSH_IDENTITY_FILE]) assert.equal(fs.statSync(f).mode & 0o777, 0o600, f);
  assert.equal(fs.readFileSync(cert, 'utf8'), 'ssh-ed25519-cert-v01@openssh.com CERTDATA\n');
  assert.match(fs.readFileSync(key, 'utf8'), /^-----BEGIN OPENSSH PRIVATE KEY-----/);
  assert.match(fs.readFileSync(e.MADE_SSH_IDENTITY_FILE, 'utf8'), /BROKER_MADE_KEY_LINE/);
  try {
    const derived = execFileSync('ssh-keygen', ['-y', '-f', key], { encoding: 'utf8' });
    assert.equal(derived.split(' ').slice(0, 2).join(' '), sentPublicKey.split(' ').slice(0, 2).join(' '));
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
  assert.equal(e.GH_TOKEN, 'ghs_APP_TOKEN_SECRET');
  assert.ok(!Object.values(e).some((v) => /PRIVATE KEY|BROKER_MADE_KEY_LINE/.test(v)), 'no key in the environment');
  for (const s of ['ghs_APP_TOKEN_SECRET', 'BROKER_MADE_KEY_LINE']) assert.ok(masked(main).includes(s), s);
  assert.deepEqual(leaks(main, ['ghs_APP_TOKEN_SECRET', 'BROKER_MADE_KEY_LINE', 'brk_rvk_REVOKE_SECRET']), []);
  const post = await runStep('post', { inputs, state: main.state });
  assert.equal(post.code, 0, post.stdout + post.stderr);
  assert.ok(!fs.existsSync(key) && !fs.existsSync(cert), 'post deleted the key and certificate');
});
