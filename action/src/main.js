'use strict';
// The action's main step: job OIDC token -> /v1/exchange -> masked outputs and environment.
//
// Order matters: every secret value is registered with `::add-mask::` before anything else is
// printed, and the revocation token is saved in state before outputs are written, so the post
// step revokes the grant even if a later line here fails.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const core = require('@actions/core');
const lib = require('./lib');
const transport = require('./transport');
const ssh = require('./ssh');

let filesDir = null;
/**
 * Write a credential file (0600) in this step's 0700 directory under the runner's per-job temp
 * dir (made on first use; the post step deletes it) and return its path.
 */
function writeFile(name, text) {
  if (!filesDir) {
    const base = process.env.RUNNER_TEMP || os.tmpdir();
    filesDir = fs.mkdtempSync(path.join(base, 'broker-'));
    fs.chmodSync(filesDir, 0o700);
    core.saveState('files-dir', filesDir);
  }
  const p = path.join(filesDir, name);
  fs.writeFileSync(p, text, { mode: 0o600, flag: 'wx' });
  return p;
}

/**
 * ssh_cert credentials: an `IdentityFile` and its `CertificateFile` (both 0600) per credential,
 * with `<NAME>_IDENTITY_FILE` / `<NAME>_CERTIFICATE_FILE` variables and outputs
 * `<name>-identity-file` / `<name>-certificate-file` naming them (paths are not secret).
 */
function writeSshFiles(grant, localKeys) {
  const vars = [];
  for (const f of lib.sshFiles(grant, localKeys)) {
    if (!f.identity || !f.certificate) {
      throw new Error(`credential ${f.name}: the broker sent no certificate or private key; list it in ssh-keys`);
    }
    const stem = lib.envStem(f.name);
    const key = writeFile(`${f.name}.key`, f.identity);
    const cert = writeFile(`${f.name}.key-cert.pub`, f.certificate);
    core.setOutput(`${f.name}-identity-file`, key);
    core.setOutput(`${f.name}-certificate-file`, cert);
    vars.push({ name: `${stem}_IDENTITY_FILE`, value: key, secret: false });
    vars.push({ name: `${stem}_CERTIFICATE_FILE`, value: cert, secret: false });
  }
  return vars;
}

/**
 * Several aws_sts credentials: write a shared credentials file and a config file and return
 * the variables naming them.
 */
function writeAwsProfiles(profiles) {
  const write = writeFile;
  return [
    { name: 'AWS_SHARED_CREDENTIALS_FILE', value: write('aws-credentials', profiles.credentials), secret: false },
    { name: 'AWS_CONFIG_FILE', value: write('aws-config', profiles.config), secret: false },
  ];
}

async function run() {
  let lastToken = null;
  try {
    const brokerUrl = core.getInput('broker-url', { required: true }).trim().replace(/\/+$/, '');
    if (!/^https?:\/\/[^\s]+$/.test(brokerUrl)) throw new Error('broker-url must be an http(s) URL');
    const requests = lib.parseCredentials(core.getInput('credentials', { required: true }));
    const audience = core.getInput('audience').trim() || brokerUrl;
    const ttl = core.getInput('ttl').trim();
    const exportEnv = lib.parseBool(core.getInput('export-env'), false);
    const attempts = lib.parseAttempts(core.getInput('attempts'));
    const ca = transport.parseCaCertificate(core.getInput('ca-certificate'));
    if (!process.env.ACTIONS_ID_TOKEN_REQUEST_URL || !process.env.ACTIONS_ID_TOKEN_REQUEST_TOKEN) {
      core.setFailed(lib.NO_ID_TOKEN_HELP);
      return;
    }
    core.saveState('broker-url', brokerUrl);

    // Key pairs made here for the credentials named in ssh-keys: only the public key is sent.
    const localKeys = {};
    const parameters = {};
    for (const name of lib.parseSshKeys(core.getInput('ssh-keys'), requests)) {
      const pair = ssh.ed25519KeyPair(`broker-action ${process.env.GITHUB_REPOSITORY || ''}`.trim());
      for (const line of pair.privateKey.split('\n')) if (line && !line.startsWith('-----')) core.setSecret(line);
      localKeys[name] = pair.privateKey;
      parameters[name] = { public_key: pair.publicLine };
    }
    const body = JSON.stringify({
      credentials: requests.map((r) => r.name),
      ...(ttl ? { ttl } : {}),
      ...(Object.keys(parameters).length ? { parameters } : {}),
    });
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
    }, { attempts, fetch: transport.brokerFetch({ ca }), notice: (m) => core.info(m) });

    const grant = lib.parseGrant(answer);
    for (const s of lib.secretValues(grant)) core.setSecret(s);
    core.saveState('revocation-token', grant.revocationToken);
    core.saveState('grant-id', grant.grantId);

    for (const o of lib.outputs(grant)) core.setOutput(o.name, o.value);
    // SSH key and certificate files are written whether or not export-env is set: outputs name
    // them, and no secret goes into a variable.
    const sshVars = writeSshFiles(grant, localKeys);
    // The grant id is not secret: later steps (and people reading the log) may use it.
    core.exportVariable('BROKER_GRANT_ID', grant.grantId);
    const exported = ['BROKER_GRANT_ID'];
    if (exportEnv) {
      const vars = lib.envVars(grant, requests).concat(sshVars);
      const profiles = lib.awsProfiles(grant);
      if (profiles) vars.push(...writeAwsProfiles(profiles));
      for (const v of vars) {
        core.exportVariable(v.name, v.value);
        exported.push(v.name);
      }
      if (profiles) core.info(`AWS profiles: ${profiles.profiles.join(', ')}`);
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
