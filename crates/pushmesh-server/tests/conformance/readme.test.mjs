// The README's snippets run as written (issue 21): every ```js block of
// README.md is saved as an ES module here (so it finds pusher-js and pusher
// in node_modules) and run with Node against a development node started as
// the quick start says (no app configured), on 127.0.0.1:6001 as the
// snippets assume.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BIN, cleanEnv, until, withTimeout } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const readme = fs.readFileSync(path.resolve(here, '../../../../README.md'), 'utf8');
const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
const children = [];
const files = [];
after(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  for (const f of files) fs.rmSync(f, { force: true });
});

function run(file, args = [], env = {}, program = process.execPath) {
  const child = spawn(program, program === process.execPath ? [file, ...args] : args, { cwd: here, env: { ...cleanEnv(), ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const out = { stdout: '', stderr: '' };
  child.stdout.on('data', (d) => { out.stdout += d; });
  child.stderr.on('data', (d) => { out.stderr += d; });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, out, exited };
}

test('the README\'s pusher-js and Node SDK snippets run as written against the development node', { timeout: 90000 }, async () => {
  assert.equal(blocks.length, 2, 'the README has a client and a server snippet');
  const [clientJs, serverJs] = blocks;
  assert.match(clientJs, /pusher-js/);
  assert.match(serverJs, /trigger/);
  const node = run(null, ['--listen', '127.0.0.1:6001'], { RUST_LOG: 'warn' }, BIN);
  await withTimeout(new Promise((resolve, reject) => {
    node.child.stdout.on('data', () => { if (/listening on 127\.0\.0\.1:6001/.test(node.out.stdout)) resolve(); });
    node.exited.then((c) => reject(new Error(`pushmesh exited ${c} (is 127.0.0.1:6001 free?): ${node.out.stderr}`)));
  }), 20000, 'the development node to listen on 127.0.0.1:6001');
  await until(() => /Development app/.test(node.out.stdout), 'the banner of the development app (no app configured)', 10000);
  const clientFile = path.join(here, '.readme-client.mjs');
  const serverFile = path.join(here, '.readme-server.mjs');
  files.push(clientFile, serverFile);
  fs.writeFileSync(clientFile, clientJs);
  fs.writeFileSync(serverFile, serverJs);
  const cl = run(clientFile);
  // The client snippet logs nothing until an event arrives: wait until the
  // node counts its subscription before the server snippet publishes.
  await until(async () => {
    if (cl.child.exitCode !== null) throw new Error(`the client snippet exited: ${cl.out.stderr}`);
    const m = await (await fetch('http://127.0.0.1:6001/metrics')).text();
    return /pushmesh_subscriptions\{kind="public"\} 1/.test(m);
  }, 'the client snippet to subscribe to orders', 30000);
  const sv = run(serverFile);
  const code = await withTimeout(sv.exited, 30000, 'the server snippet to finish');
  assert.equal(code, 0, `the server snippet ran without error: ${sv.out.stderr}`);
  await until(() => /id: 42/.test(cl.out.stdout), 'the client snippet to print the event', 20000);
  assert.equal(cl.out.stderr, '', 'the client snippet printed no error');
});
