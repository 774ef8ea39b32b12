// Bundle src/ into dist/ (committed: the runner does not install dependencies).
// `node build.mjs --check` rebuilds into a temp dir and fails when dist/ differs (stale dist).
import * as esbuild from 'esbuild';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// Paths are relative to action/, wherever this is run from.
process.chdir(new URL('.', import.meta.url).pathname);
const check = process.argv.includes('--check');
const outdir = check ? mkdtempSync(join(tmpdir(), 'broker-action-dist-')) : 'dist';
const entries = ['main', 'post'];

await esbuild.build({
  entryPoints: Object.fromEntries(entries.map((e) => [e, `src/${e}.js`])),
  bundle: true,
  platform: 'node',
  target: 'node24',
  format: 'cjs',
  outdir,
  legalComments: 'eof',
  logLevel: 'warning',
});

if (check) {
  const stale = [];
  for (const f of readdirSync(outdir)) {
    let committed = null;
    try { committed = readFileSync(join('dist', f), 'utf8'); } catch { committed = null; }
    if (committed !== readFileSync(join(outdir, f), 'utf8')) stale.push(f);
  }
  rmSync(outdir, { recursive: true, force: true });
  if (stale.length) {
    console.error(`dist/ is stale (${stale.join(', ')}): run \`npm run build\` in action/ and commit dist/`);
    process.exit(1);
  }
  console.log('dist/ is up to date');
}
