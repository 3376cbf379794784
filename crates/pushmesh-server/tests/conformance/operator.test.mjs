// What a new operator hits (issue 21), against a real pushmesh process:
// SIGHUP never stops a node; strict loading of values (exit 2 naming the
// key); the node-state and process metrics; every metric the shipped
// Prometheus rules and Grafana dashboard name exists; the dashboard token
// from the environment.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, until, withTimeout, cleanEnv, BIN, APP, clusteredToml } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const deploy = path.resolve(here, '../../../../deploy');
const servers = [];
const start = async (opts) => { const s = await startServer(opts); servers.push(s); return s; };
after(async () => { for (const s of servers) await s.stop().catch(() => {}); });

const metricsOf = async (port) => (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
const value = (text, series) => {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
};

/** Runs the binary to its end with a config file; resolves { code, stderr }. */
function runToExit(toml, args = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-strict-'));
  const file = path.join(dir, 'pushmesh.toml');
  fs.writeFileSync(file, toml);
  return withTimeout(new Promise((resolve) => {
    const child = spawn(BIN, ['--listen', '127.0.0.1:0', '--config', file, ...args], { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => { stderr += d; });
    child.on('exit', (code) => resolve({ code, stderr }));
  }), 15000, 'pushmesh to refuse its configuration');
}

test('SIGHUP on a node without TLS: it keeps running and serving, and logs what it reloaded (no certificate; the apps)', async () => {
  const srv = await start({ env: { RUST_LOG: 'info' } });
  // One at a time: signals that arrive together may be handled as one.
  for (let k = 1; k <= 3; k++) {
    srv.child.kill('SIGHUP');
    await until(() => (srv.stderr().match(/SIGHUP: no TLS certificate to reload/g) || []).length === k
      && (srv.stderr().match(/SIGHUP: apps (not )?reloaded/g) || []).length === k, `log lines of SIGHUP #${k}`, 10000);
  }
  assert.equal(srv.child.exitCode, null, `still running (exit ${srv.child.exitCode}, signal ${srv.child.signalCode})`);
  assert.equal((await fetch(`http://127.0.0.1:${srv.port}/healthz`)).status, 200);
});

test('strict loading: a bad URL, seed or origin stops the node at start with exit 2 naming the key', async () => {
  const app = `[[apps]]\nid = "a"\nkey = "k"\nsecret = "s"\n`;
  const cases = [
    [`${app}[[apps.webhooks]]\nurl = "not a url"\n`, /apps\[id="a"\]\.webhooks\[0\]\.url = "not a url"/],
    [`${app}[[apps.webhooks]]\nurl = "ftp://example.com/x"\n`, /webhooks\[0\]\.url .*http:\/\/ or https:\/\//],
    [`${app}[apps.authorizer]\nurl = "http//missing-colon"\n`, /apps\[id="a"\]\.authorizer\.url/],
    [`${app}allowed_origins = ["https://good.example/"]\n`, /allowed_origins = "https:\/\/good\.example\/" .*did you mean "https:\/\/good\.example"/],
    [`${app}[[apps.webhooks]]\nurl = "https://example.com"\nheaders = { "Bad Header" = "x" }\n`, /webhooks\[0\]\.headers = "Bad Header" is not a header name/],
    [`trusted_proxies = ["10.0.0.300/8"]\n${app}`, /trusted_proxies.*invalid address range/s],
    [`[cluster]\ngossip_listen = "127.0.0.1:0"\ngossip_advertise = "127.0.0.1:1"\nsecret = "a-secret-of-sixteen-plus"\nseeds = ["10.0.0.1"]\n${app}`, /seeds = "10\.0\.0\.1" must be HOST:PORT/],
  ];
  for (const [toml, expected] of cases) {
    const { code, stderr } = await runToExit(toml);
    assert.equal(code, 2, `exit 2 for ${JSON.stringify(toml)}: ${stderr}`);
    assert.match(stderr, expected);
  }
});

test('metrics: pushmesh_build_info, pushmesh_ready and pushmesh_draining follow /readyz through a drain; process_max_fds', async () => {
  const srv = await startServer({ configToml: clusteredToml('drain_wait_ms = 3000') });
  await until(async () => (await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status === 200, 'ready after joining', 30000);
  let m = await metricsOf(srv.port);
  assert.match(m, /^pushmesh_build_info\{version="\d+\.\d+\.\d+",commit="[0-9a-f]{7,40}|unknown"\} 1$/m);
  assert.equal(value(m, 'pushmesh_ready'), 1);
  assert.equal(value(m, 'pushmesh_draining'), 0);
  assert.ok(value(m, 'process_max_fds') >= value(m, 'process_open_fds'), 'process_max_fds is the limit');
  srv.child.kill('SIGTERM');
  await until(async () => value(await metricsOf(srv.port), 'pushmesh_draining') === 1, 'pushmesh_draining 1 after SIGTERM', 10000);
  m = await metricsOf(srv.port);
  assert.equal(value(m, 'pushmesh_ready'), 0, 'not ready while draining');
  assert.equal((await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status, 503);
  assert.equal((await withTimeout(srv.exited, 20000, 'exit')).code, 0);
});

test('every metric the shipped Prometheus rules and Grafana dashboard name is exported by a clustered node', async () => {
  const srv = await start({ configToml: clusteredToml() });
  await until(async () => (await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status === 200, 'ready', 30000);
  // A request of each kind the rules' queries look at.
  await fetch(`http://127.0.0.1:${srv.port}/apps/${APP.id}/events`, { method: 'POST', body: '{}' });
  const m = await metricsOf(srv.port);
  const exported = new Set([...m.matchAll(/^# TYPE (\S+) /gm)].map((x) => x[1]));
  const names = (text) => new Set([...text.matchAll(/\b((?:pushmesh|process)_[a-z_]+)/g)].map((x) => x[1].replace(/_(bucket|sum|count)$/, '')));
  const rules = fs.readFileSync(path.join(deploy, 'prometheus/pushmesh.rules.yml'), 'utf8');
  const dash = JSON.stringify(JSON.parse(fs.readFileSync(path.join(deploy, 'grafana/pushmesh.json'), 'utf8')).panels);
  for (const [what, text] of [['rules', rules], ['dashboard', dash]]) {
    const used = [...names(text)];
    assert.ok(used.length >= 10, `${what}: ${used.length} metrics`);
    const missing = used.filter((n) => !exported.has(n));
    assert.deepEqual(missing, [], `${what} names metrics the node does not export`);
  }
});

test('PUSHMESH_DASHBOARD_TOKEN opens the status page and is a known variable', async () => {
  const srv = await start({ env: { PUSHMESH_DASHBOARD_TOKEN: 'from-env', RUST_LOG: 'warn' } });
  const base = `http://127.0.0.1:${srv.port}`;
  assert.equal((await fetch(`${base}/dashboard/api/stats`, { headers: { authorization: 'Bearer from-env' } })).status, 200,
    'the token from the environment opens the page');
  assert.equal((await fetch(`${base}/dashboard/api/stats`, { headers: { authorization: 'Bearer nope' } })).status, 401);
  // The token never goes in a URL (a balancer's access log would keep it).
  assert.equal((await fetch(`${base}/dashboard?token=from-env`)).status, 400);
  assert.doesNotMatch(srv.stderr(), /unknown environment variable/);
  assert.doesNotMatch(srv.stderr(), /from-env/, 'the token is never logged');
});
