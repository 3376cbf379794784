// The status page in a real headless Chromium (Debian's chromium), driven by Playwright.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { startServer, serverSdk, client, subscribed, until, closeAll, APP, APP_TOML } from './helpers.mjs';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../test-artifacts');

const servers = [];
let browser;
after(async () => {
  closeAll();
  if (browser) await browser.close();
  for (const s of servers) await s.stop().catch(() => {});
});

const base = (srv) => `http://127.0.0.1:${srv.port}`;
const bearer = (t) => ({ headers: { authorization: `Bearer ${t}` } });
const login = (srv, token) => fetch(`${base(srv)}/dashboard/login`, {
  method: 'POST', redirect: 'manual',
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  body: new URLSearchParams({ token }).toString(),
});

test('the status page is off by default; its token goes in a header or cookie, never the URL', async () => {
  const off = await startServer();
  servers.push(off);
  assert.equal((await fetch(`${base(off)}/dashboard`)).status, 404);
  assert.equal((await fetch(`${base(off)}/dashboard/api/stats`)).status, 404);
  const on = await startServer({ configToml: `dashboard_token = "t0ken-dashboard"\n${APP_TOML}` });
  servers.push(on);
  // Without a session: the login form, and the API says 401 in JSON.
  const form = await fetch(`${base(on)}/dashboard`);
  assert.equal(form.status, 200);
  const html = await form.text();
  assert.match(html, /id="token"/);
  assert.match(html, /id="login"/);
  assert.doesNotMatch(html, /id="connections"/);
  const noSession = await fetch(`${base(on)}/dashboard/api/stats`);
  assert.equal(noSession.status, 401);
  assert.match((await noSession.json()).error, /Bearer/);
  // The token in the URL is refused, right or wrong.
  for (const p of ['/dashboard?token=t0ken-dashboard', '/dashboard/api/stats?token=t0ken-dashboard', '/dashboard/api/stats?token=nope']) {
    const r = await fetch(`${base(on)}${p}`);
    assert.equal(r.status, 400, p);
    assert.match((await r.json()).error, /never the URL/);
  }
  // A bearer header.
  assert.equal((await fetch(`${base(on)}/dashboard/api/stats`, bearer('nope'))).status, 401);
  const ok = await fetch(`${base(on)}/dashboard/api/stats`, bearer('t0ken-dashboard'));
  assert.equal(ok.status, 200);
  const s = await ok.json();
  assert.ok(Array.isArray(s.history), 'history');
  assert.deepEqual(s.apps.map((a) => [a.id, a.source]), [[APP.id, 'config']]);
  // The login form: a wrong token is 401; the right one sets the cookie.
  assert.equal((await login(on, 'nope')).status, 401);
  const r = await login(on, 't0ken-dashboard');
  assert.equal(r.status, 303);
  assert.equal(r.headers.get('location'), '/dashboard');
  const set = r.headers.get('set-cookie');
  assert.match(set, /^pushmesh_dashboard=[0-9a-f]{64};/);
  for (const flag of [/HttpOnly/, /SameSite=Strict/, /Path=\/dashboard/]) assert.match(set, flag);
  assert.doesNotMatch(set, /t0ken-dashboard/, 'the cookie is not the token');
  const cookie = set.split(';')[0];
  const page = await fetch(`${base(on)}/dashboard`, { headers: { cookie } });
  assert.match(await page.text(), /id="connections"/);
  assert.equal((await fetch(`${base(on)}/dashboard/api/stats`, { headers: { cookie } })).status, 200);
  assert.equal((await fetch(`${base(on)}/dashboard/api/stats`, { headers: { cookie: 'pushmesh_dashboard=00' } })).status, 401);
  // Log out clears it.
  const out = await fetch(`${base(on)}/dashboard/logout`, { method: 'POST', redirect: 'manual', headers: { cookie } });
  assert.match(out.headers.get('set-cookie'), /Max-Age=0/);
});

test('failed dashboard logins from one address are limited: 429 with Retry-After, JSON', async () => {
  const srv = await startServer({ configToml: `dashboard_token = "t0ken-dashboard"\n${APP_TOML}` });
  servers.push(srv);
  let limited = null;
  for (let k = 0; k < 30 && !limited; k++) {
    const r = await login(srv, `wrong-${k}`);
    if (r.status === 429) limited = r;
    else assert.equal(r.status, 401);
  }
  assert.ok(limited, 'limited within 30 failures');
  assert.equal(limited.headers.get('retry-after'), '1');
  assert.match((await limited.json()).error, /too many/);
  // The right token too, until the address has tokens again.
  assert.equal((await fetch(`${base(srv)}/dashboard/api/stats`, bearer('t0ken-dashboard'))).status, 429);
});

test('renders live numbers in Chromium and the debug console shows a published event', async () => {
  assert.ok(fs.existsSync(CHROMIUM), `chromium not found at ${CHROMIUM}`);
  const srv = await startServer({ configToml: `dashboard_token = "t0ken-dashboard"\n${APP_TOML}client_events = true\n` });
  servers.push(srv);
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  await subscribed(c.subscribe('watched'));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  const urls = [];
  page.on('request', (r) => urls.push(r.url()));
  await page.goto(`http://127.0.0.1:${srv.port}/dashboard`);
  await page.fill('#token', 't0ken-dashboard');
  await Promise.all([page.waitForNavigation(), page.click('#login')]);
  // Live numbers: the pusher-js client above is one connection.
  await page.waitForFunction(() => Number(document.getElementById('connections').textContent) >= 1, null, { timeout: 15000 });
  assert.match(await page.textContent('#channels'), /public: 1 channels, 1 subscriptions/);
  await page.fill('#channel', 'private-debugged');
  await page.click('#listen');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('listening'), null, { timeout: 15000 });
  const sdk = serverSdk(srv.port);
  await sdk.trigger('private-debugged', 'order-shipped', { id: 42 });
  await page.waitForFunction(() => document.getElementById('log').textContent.includes('order-shipped'), null, { timeout: 15000 });
  assert.match(await page.textContent('#log'), /private-debugged order-shipped \{"id":42\}/);
  // The rate chart moves: publish more and wait for a non-zero rate (the
  // server samples every 5 s).
  for (let k = 0; k < 5; k++) await sdk.trigger('watched', 'tick', { k });
  await page.waitForFunction(() => Number(document.getElementById('pubrate').textContent) > 0, null, { timeout: 45000 });
  // The app's row: its connections (the pusher-js client and the console's).
  await page.waitForFunction((id) => [...document.querySelectorAll('#apps tr.n')].some((r) => r.cells[0].textContent === id && Number(r.cells[3].textContent) >= 1), APP.id, { timeout: 45000 });
  assert.ok(urls.length > 3, 'the page made requests');
  assert.ok(urls.every((u) => !u.includes('t0ken')), `no token in any URL: ${urls.filter((u) => u.includes('t0ken'))}`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const shot = path.join(ARTIFACTS, 'dashboard.png');
  await page.screenshot({ path: shot, fullPage: true });
  assert.ok(fs.statSync(shot).size > 10000, 'screenshot saved');
});
