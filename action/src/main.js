'use strict';
// The action's main step: job OIDC token -> /v1/exchange -> masked outputs and environment.
//
// Order matters: every secret value is registered with `::add-mask::` before anything else is
// printed, and the revocation token is saved in state before outputs are written, so the post
// step revokes the grant even if a later line here fails.

const core = require('@actions/core');
const lib = require('./lib');

async function run() {
  let lastToken = null;
  try {
    const brokerUrl = core.getInput('broker-url', { required: true }).trim().replace(/\/+$/, '');
    if (!/^https?:\/\/[^\s]+$/.test(brokerUrl)) throw new Error('broker-url must be an http(s) URL');
    const requests = lib.parseCredentials(core.getInput('credentials', { required: true }));
    const audience = core.getInput('audience').trim() || brokerUrl;
    const ttl = core.getInput('ttl').trim();
    const exportEnv = lib.parseBool(core.getInput('export-env'), false);
    const attempts = Number.parseInt(core.getInput('attempts') || '5', 10) || 5;
    if (!process.env.ACTIONS_ID_TOKEN_REQUEST_URL || !process.env.ACTIONS_ID_TOKEN_REQUEST_TOKEN) {
      core.setFailed(lib.NO_ID_TOKEN_HELP);
      return;
    }
    core.saveState('broker-url', brokerUrl);

    const body = JSON.stringify({ credentials: requests.map((r) => r.name), ...(ttl ? { ttl } : {}) });
    const answer = await lib.postWithRetries(async () => {
      // A fresh token per attempt: the broker accepts each job token once.
      lastToken = await core.getIDToken(audience); // getIDToken masks it
      return {
        url: `${brokerUrl}/v1/exchange`,
        headers: {
          authorization: `Bearer ${lastToken}`,
          'content-type': 'application/json',
          'user-agent': 'broker-action/1',
        },
        body,
      };
    }, { attempts, notice: (m) => core.info(m) });

    const grant = lib.parseGrant(answer);
    for (const s of lib.secretValues(grant)) core.setSecret(s);
    core.saveState('revocation-token', grant.revocationToken);
    core.saveState('grant-id', grant.grantId);

    for (const o of lib.outputs(grant)) core.setOutput(o.name, o.value);
    const exported = [];
    if (exportEnv) {
      for (const v of lib.envVars(grant, requests)) {
        core.exportVariable(v.name, v.value);
        exported.push(v.name);
      }
    }
    const names = grant.credentials.map((c) => c.name).join(', ');
    core.info(`granted ${names} (grant ${grant.grantId}, expires ${grant.expiresAt})`);
    if (exported.length) core.info(`exported: ${exported.join(', ')}`);
  } catch (e) {
    if (e instanceof lib.BrokerError && e.refusal) {
      for (const line of lib.explainRefusal(e, lastToken && lib.unverifiedClaims(lastToken))) core.info(line);
    }
    core.setFailed(e && e.message ? e.message : String(e));
  }
}

run();
