'use strict';
// Runs the bundled action (dist/) the way the GitHub runner does, without a runner:
// - inputs as INPUT_<NAME> environment variables (upper-cased, spaces to `_`, dashes kept);
// - fresh GITHUB_OUTPUT / GITHUB_ENV / GITHUB_STATE files per step, read back afterwards;
// - the post step sees main's state as STATE_<name> variables.
// The job's OIDC token endpoint (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN) comes from the caller's
// environment: in tests it is a local server of ours.
//
// CLI (used by integration/tests/suite/pipelines.rs):
//   node action/harness/runner.js DIR
// reads DIR/inputs.json, runs main then post, and writes DIR/result.json
// ({main: {...}, post: {...}}, each with code, stdout, stderr, outputs, env, state).
// With BROKER_HARNESS_PAUSE=1 it writes DIR/main.json after main, then waits for DIR/go
// before running post (so the caller can check the credential between the two).

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const os = require('node:os');

const DIST = path.join(__dirname, '..', 'dist');

/**
 * The node that runs the action: the one action.yml's `runs.using` names. `npm ci` in action/
 * installs it (the npm package `node`, a dev dependency) as node_modules/.bin/node;
 * BROKER_ACTION_NODE overrides; without either, the node running this file.
 */
function actionNode() {
  if (process.env.BROKER_ACTION_NODE) return process.env.BROKER_ACTION_NODE;
  const local = path.join(__dirname, '..', 'node_modules', '.bin', 'node');
  return fs.existsSync(local) ? local : process.execPath;
}

/** The major version action.yml's `runs.using: nodeNN` asks for. */
function declaredNodeMajor() {
  const yml = fs.readFileSync(path.join(__dirname, '..', 'action.yml'), 'utf8');
  const m = /^\s+using:\s*['"]?node(\d+)['"]?\s*$/m.exec(yml);
  return m ? Number(m[1]) : null;
}

/** Parse a runner file-command file: `name=value` lines and `name<<DELIM ... DELIM` blocks. */
function parseFileCommands(text) {
  const out = {};
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (!line) continue;
    const heredoc = line.match(/^([^=<]+)<<(.+)$/);
    if (heredoc) {
      const [, name, delim] = heredoc;
      const value = [];
      for (i++; i < lines.length && lines[i] !== delim; i++) value.push(lines[i]);
      out[name] = value.join('\n');
    } else {
      const eq = line.indexOf('=');
      if (eq > 0) out[line.slice(0, eq)] = line.slice(eq + 1);
    }
  }
  return out;
}

function inputEnv(inputs) {
  const env = {};
  for (const [k, v] of Object.entries(inputs || {})) env[`INPUT_${k.replace(/ /g, '_').toUpperCase()}`] = String(v);
  return env;
}

/** Run a child to completion (async, so servers in this process keep answering). */
function runChild(args, opts) {
  return new Promise((resolve) => {
    const child = spawn(actionNode(), args, { env: opts.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => { stdout += c; });
    child.stderr.on('data', (c) => { stderr += c; });
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeout);
    child.on('close', (status) => { clearTimeout(timer); resolve({ status, stdout, stderr }); });
  });
}

/** Run one step (`main` or `post`). */
async function runStep(step, { inputs = {}, env = {}, state = {}, dir } = {}) {
  const work = dir || fs.mkdtempSync(path.join(os.tmpdir(), 'broker-action-'));
  const files = {};
  for (const k of ['OUTPUT', 'ENV', 'STATE']) {
    files[k] = path.join(work, `${step}-${k.toLowerCase()}`);
    fs.writeFileSync(files[k], '');
  }
  // The runner's per-job temp directory (where the action writes credential files).
  const runnerTemp = path.join(work, 'runner-temp');
  fs.mkdirSync(runnerTemp, { recursive: true });
  const stateEnv = {};
  for (const [k, v] of Object.entries(state)) stateEnv[`STATE_${k}`] = v;
  const r = await runChild([path.join(DIST, `${step}.js`)], {
    env: {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      ...env,
      ...inputEnv(inputs),
      ...stateEnv,
      GITHUB_OUTPUT: files.OUTPUT,
      GITHUB_ENV: files.ENV,
      GITHUB_STATE: files.STATE,
      GITHUB_ACTIONS: 'true',
      RUNNER_TEMP: runnerTemp,
    },
    timeout: 120_000,
  });
  const read = (k) => parseFileCommands(fs.readFileSync(files[k], 'utf8'));
  return {
    code: r.status,
    stdout: r.stdout,
    stderr: r.stderr,
    outputs: read('OUTPUT'),
    env: read('ENV'),
    state: read('STATE'),
  };
}

/**
 * The secrets a step leaked: values that appear in stdout/stderr outside `::add-mask::` lines.
 * `secrets` are the values to look for.
 */
function leaks(result, secrets) {
  const text = `${result.stdout}\n${result.stderr}`
    .split('\n')
    .filter((l) => !l.startsWith('::add-mask::'))
    .join('\n');
  return secrets.filter((s) => s && text.includes(s));
}

/** Values that were masked, in order. */
function masked(result) {
  return result.stdout.split('\n').filter((l) => l.startsWith('::add-mask::')).map((l) => l.slice(12));
}

async function cli(dir) {
  const spec = JSON.parse(fs.readFileSync(path.join(dir, 'inputs.json'), 'utf8'));
  const env = {};
  // The job's token endpoint, and the proxy settings a runner's environment may carry.
  for (const k of ['ACTIONS_ID_TOKEN_REQUEST_URL', 'ACTIONS_ID_TOKEN_REQUEST_TOKEN',
    'HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'NO_PROXY', 'no_proxy']) {
    if (process.env[k]) env[k] = process.env[k];
  }
  const main = await runStep('main', { inputs: spec, env, dir });
  if (process.env.BROKER_HARNESS_PAUSE === '1') {
    fs.writeFileSync(path.join(dir, 'main.json'), JSON.stringify(main));
    const go = path.join(dir, 'go');
    for (let i = 0; i < 1200 && !fs.existsSync(go); i++) await new Promise((r) => setTimeout(r, 100));
  }
  const post = await runStep('post', { inputs: spec, env, state: main.state, dir });
  fs.writeFileSync(path.join(dir, 'result.json'), JSON.stringify({ main, post }));
}

module.exports = { parseFileCommands, runStep, leaks, masked, actionNode, declaredNodeMajor };

if (require.main === module) {
  cli(process.argv[2]).catch((e) => { console.error(e); process.exit(1); });
}
