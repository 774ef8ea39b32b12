'use strict';
// The action's post step (runs with `post-if: always()`: after success, failure and
// cancellation): revoke the grant that main saved in state. A failure is a warning unless
// `fail-on-revoke-error` is true; the credentials expire at their TTL regardless.

const fs = require('node:fs');
const core = require('@actions/core');
const lib = require('./lib');
const transport = require('./transport');

/** Delete the files main wrote (AWS profiles); they hold secrets. */
function removeFiles() {
  const dir = core.getState('files-dir');
  if (!dir) return;
  try {
    fs.rmSync(dir, { recursive: true, force: true });
  } catch (e) {
    core.warning(`could not delete the credential files in ${dir} (${e.code || 'error'})`);
  }
}

async function run() {
  const token = core.getState('revocation-token');
  const brokerUrl = core.getState('broker-url');
  let strict = false;
  try {
    strict = lib.parseBool(core.getInput('fail-on-revoke-error'), false);
  } catch (e) {
    core.warning(`fail-on-revoke-error: ${e.message}`);
  }
  removeFiles();
  if (!token || !brokerUrl) {
    core.info('nothing to revoke: no grant was issued');
    return;
  }
  core.setSecret(token);
  const attempts = lib.parseAttempts(core.getInput('attempts'));
  try {
    const ca = transport.parseCaCertificate(core.getInput('ca-certificate'));
    const answer = await lib.postWithRetries(async () => ({
      url: `${brokerUrl}/v1/revoke`,
      headers: { authorization: `Bearer ${token}`, 'user-agent': 'broker-action/1' },
    }), { attempts, fetch: transport.brokerFetch({ ca }), notice: (m) => core.info(m) });
    core.info(`grant ${answer && answer.grant_id} ${answer && answer.status}`);
  } catch (e) {
    const msg = `revoking grant ${core.getState('grant-id')} failed: ${e.message}; `
      + 'its credentials still expire at their TTL';
    if (strict) core.setFailed(msg);
    else core.warning(msg);
  }
}

run();
