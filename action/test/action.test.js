'use strict';
// The bundled action (dist/) run as the runner runs it (harness/runner.js), against local
// stand-ins: a token endpoint playing the runner's ACTIONS_ID_TOKEN_REQUEST_URL, and a fake
// broker scripted per test. The real broker is exercised by integration/tests/pipelines.rs.
const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const { runStep, leaks, masked } = require('../harness/runner');

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
    srv.listen(0, '127.0.0.1', () => resolve({ url: `http://127.0.0.1:${srv.address().port}`, calls, close: () => srv.close() }));
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
  assert.deepEqual(main.env, {});
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
