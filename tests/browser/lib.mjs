// Shared by the browser scenarios: Debian's Chromium driven by playwright-core (no browser
// download), a fresh empty profile per run, bounded waits, screenshots, and a hand-shake with
// the Rust test that runs the scenario (tests/dashboard.rs): `WAIT name` on stdout, then the
// scenario waits for the file `$HF_SYNC/name`.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const env = process.env;
export const WIDE = { width: 1280, height: 900 };
export const PHONE = { width: 412, height: 915 };

// The whole scenario is bounded; a hang fails it.
const watchdog = setTimeout(() => {
  console.error('scenario timed out after 300 s');
  process.exit(2);
}, 300_000);

export function check(cond, message) {
  if (!cond) throw new Error('assertion failed: ' + message);
}

export function say(what, data) {
  console.log(JSON.stringify({ step: what, ...(data || {}) }));
}

// Poll `f` until it returns something truthy (bounded in count and time).
export async function until(f, message, ms = 60_000, every = 100) {
  const end = Date.now() + ms;
  for (let i = 0; Date.now() < end && i < ms / every + 1; i += 1) {
    const v = await f();
    if (v) return v;
    await new Promise((r) => setTimeout(r, every));
  }
  throw new Error('timed out (' + ms + ' ms): ' + message);
}

export async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'holdfast-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: env.HF_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: WIDE,
    // Not UTC, so the page must convert: times in the browser's zone, UTC on hover.
    timezoneId: 'America/New_York',
    locale: 'en-US',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--disable-quic', '--no-first-run'],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error' && !/status of 40[0-9]/.test(m.text())) errors.push(m.text()); });
  const done = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
    clearTimeout(watchdog);
    check(errors.length === 0, 'no script errors in the page: ' + errors.join(' | '));
  };
  return { context, page, done, errors };
}

export async function login(page, user, password) {
  await page.goto(env.HF_URL + '/');
  await page.fill('#login-user', user);
  await page.fill('#login-password', password);
  await page.click('form.login button[type=submit]');
  await page.waitForSelector('#who-name:has-text("' + user + '")');
  await page.waitForSelector('main[data-ready]');
}

export async function logout(page) {
  await page.click('#signout');
  await page.waitForSelector('#login-user');
}

// A screenshot of the page at both widths, into $HF_SHOTS.
export async function shots(page, name) {
  for (const [w, size] of [['1280', WIDE], ['412', PHONE]]) {
    await page.setViewportSize(size);
    await page.waitForTimeout(150);
    await page.screenshot({ path: path.join(env.HF_SHOTS, name + '-' + w + '.png'), fullPage: true });
  }
  await page.setViewportSize(WIDE);
}

export async function sync(name) {
  say('WAIT', { name });
  await until(() => fs.existsSync(path.join(env.HF_SYNC, name)), 'the test to answer ' + name, 120_000, 50);
}

// A call to the API from inside the page, with its session and CSRF token.
export async function apiCall(page, method, p, body) {
  return page.evaluate(async ([method, p, body]) => {
    const me = await (await fetch('/api/v1/whoami')).json();
    const r = await fetch('/api/v1' + p, {
      method,
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf || '' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let json = null;
    try { json = JSON.parse(text); } catch (_) { json = text; }
    return { status: r.status, body: json };
  }, [method, p, body]);
}

// The newest task of a VM of `kind`, once it has ended.
export async function taskEnded(page, vm, kind, after) {
  return until(async () => {
    const r = await apiCall(page, 'GET', '/tasks?vm=' + vm + '&kind=' + kind);
    const t = r.body.filter((t) => t.started_ms >= after).pop();
    return t && t.state !== 'running' && t.state !== 'queued' ? t : null;
  }, kind + ' of ' + vm + ' to end', 120_000, 250);
}

export async function run(main) {
  try {
    await main();
    say('DONE');
    process.exit(0);
  } catch (e) {
    console.error(e && e.stack ? e.stack : String(e));
    process.exit(1);
  }
}

// Every control on the page has a name a screen reader can say (a label, aria-label or text).
export async function allLabelled(page, where) {
  const unnamed = await page.evaluate(() => {
    const named = (e) => (e.getAttribute('aria-label') || '').trim()
      || (e.labels && [...e.labels].some((l) => l.textContent.trim()))
      || (['BUTTON', 'A'].includes(e.tagName) && e.textContent.trim())
      || (e.getAttribute('aria-labelledby') && document.getElementById(e.getAttribute('aria-labelledby')));
    return [...document.querySelectorAll('button, input, select, textarea, a[href]')]
      .filter((e) => e.offsetParent !== null || e.closest('dialog[open]'))
      .filter((e) => !named(e))
      .map((e) => e.outerHTML.slice(0, 120));
  });
  check(unnamed.length === 0, 'every control on ' + where + ' has a label: ' + unnamed.join(' | '));
}
