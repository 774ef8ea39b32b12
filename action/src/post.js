'use strict';
// The action's post step (runs with `post-if: always()`: after success, failure and
// cancellation): revoke the grant that main saved in state. A failure is a warning unless
// `fail-on-revoke-error` is true; the credentials expire at their TTL regardless.

const core = require('@actions/core');
const lib = require('./lib');

async function run() {
  const token = core.getState('revocation-token');
  const brokerUrl = core.getState('broker-url');
  let strict = false;
  try {
    strict = lib.parseBool(core.getInput('fail-on-revoke-error'), false);
  } catch (e) {
    core.warning(`fail-on-revoke-error: ${e.message}`);
  }
  if (!token || !brokerUrl) {
    core.info('nothing to revoke: no grant was issued');
    return;
  }
  core.setSecret(token);
  const attempts = Number.parseInt(core.getInput('attempts') || '5', 10) || 5;
  try {
    const answer = await lib.postWithRetries(async () => ({
      url: `${brokerUrl}/v1/revoke`,
      headers: { authorization: `Bearer ${token}`, 'user-agent': 'broker-action/1' },
    }), { attempts, notice: (m) => core.info(m) });
    core.info(`grant ${answer && answer.grant_id} ${answer && answer.status}`);
  } catch (e) {
    const msg = `revoking grant ${core.getState('grant-id')} failed: ${e.message}; `
      + 'its credentials still expire at their TTL';
    if (strict) core.setFailed(msg);
    else core.warning(msg);
  }
}

run();
