// Backups through the page (tests/dashboard.rs sets the scene): an operator creates a backup
// of a VM's real disk and watches it rise and turn green, reloads mid-backup, restores it into
// a restore directory, fills the second of two slots and finds the button disabled with its
// reason, sees a failed backup in red with its message; then a viewer finds no control that
// changes anything, and the API refuses a forged request.
import { env, check, say, until, launch, login, logout, shots, apiCall, taskEnded, run, allLabelled } from './lib.mjs';

const VM = env.HF_VM;
const BROKEN = env.HF_BROKEN_VM;

async function percentNow(page) {
  const l = page.locator('tr.live .pct');
  if ((await l.count()) === 0) return null; // (no waiting for a row that is gone)
  const t = await l.first().textContent({ timeout: 1000 }).catch(() => null);
  const m = t && t.match(/(\d+) %/);
  return m ? Number(m[1]) : null;
}

// By keyboard: focus the button, Enter opens the dialog (focus on its action), Enter confirms.
async function createBackup(page, live = true) {
  await page.focus('#create-backup');
  await page.keyboard.press('Enter');
  await page.waitForSelector('#dialog[open] button.primary:focus');
  await page.keyboard.press('Enter');
  if (live) await page.waitForSelector('tr.live');
}

run(async () => {
  const { page, done } = await launch();
  await login(page, env.HF_OPERATOR, env.HF_OPERATOR_PASSWORD);

  // The VM list: both VMs, idle, no backup, 0 of the default 2 slots.
  const row = page.locator('tr[data-vm="' + VM + '"]');
  await row.waitFor();
  check((await row.locator('.slots').textContent()) === '0 / 2', 'the list shows 0 / 2 slots');
  check((await row.textContent()).includes('Idle'), 'the VM is idle');
  await page.fill('#vm-filter', BROKEN);
  await until(async () => (await page.locator('tbody tr[data-vm]').count()) === 1, 'the filter to leave one VM');
  check(await page.locator('tr[data-vm="' + BROKEN + '"]').isVisible(), 'the filter keeps the matching VM');
  await page.fill('#vm-filter', '');
  await allLabelled(page, 'the VM list');

  // Create Backup: the entry appears amber and its percentage rises by itself.
  await row.locator('a').click();
  await page.waitForSelector('#create-backup:not([disabled])');
  check((await page.textContent('#slot-counter')) === '0 / 2', 'the card shows 0 / 2');
  await allLabelled(page, 'the Backups card');
  const t0 = Date.now();
  await createBackup(page);
  check(await page.locator('tr.live .dot.amber').isVisible(), 'a running backup pulses amber');
  check(await page.locator('#create-backup').isDisabled(), 'Create Backup is disabled while one runs');
  const seen = [];
  const watch = async (until_) => until(async () => {
    const p = await percentNow(page);
    if (p !== null && (seen.length === 0 || p !== seen[seen.length - 1])) seen.push(p);
    return until_();
  }, 'the percentage to rise (seen ' + seen.join(',') + ')', 60_000, 100);
  await watch(() => seen.length >= 2 && seen[seen.length - 1] > 0);
  await shots(page, 'backup-running');

  // Reload mid-backup: the page picks the running backup up where it is.
  const before = seen[seen.length - 1];
  check(before < 100, 'the reload happens mid-backup (at ' + before + ' %)');
  await page.reload();
  await page.waitForSelector('tr.live .dot.amber');
  const after = await until(() => percentNow(page), 'a percentage after the reload');
  check(after >= before, 'after the reload the progress is still shown (' + before + ' → ' + after + ')');
  say('reloaded', { before, after, ms: Date.now() - t0 });
  seen.push(after);
  await watch(async () => (await page.locator('tr.live').count()) === 0);
  const rising = seen.filter((p, i) => i === 0 || p !== seen[i - 1]);
  for (let i = 1; i < rising.length; i += 1) check(rising[i] > rising[i - 1], 'the percentage only rises: ' + seen.join(','));
  check(rising.length >= 3, 'the percentage rose in steps: ' + seen.join(','));
  say('percent', { seen: rising });

  // It ends green, with its size, in slot 1 of 2.
  await page.waitForSelector('tr[data-backup]', { timeout: 120_000 });
  await until(async () => (await page.locator('tr.live').count()) === 0, 'the live row to go');
  const b = page.locator('tr[data-backup]').first();
  check((await b.locator('.dot').getAttribute('class')) === 'dot ', 'the finished backup is green');
  check(/MiB/.test(await b.locator('.size').textContent()), 'the entry shows the backup\'s size');
  check((await page.textContent('#slot-counter')) === '1 / 2', 'the counter says 1 / 2');
  const first = await b.getAttribute('data-backup');
  // Its time is New York's (the browser's zone), UTC on hover.
  const when = b.locator('time');
  const iso = await when.getAttribute('datetime');
  const local = new Date(iso).toLocaleString('en-US', { timeZone: 'America/New_York', dateStyle: 'medium', timeStyle: 'short' });
  check((await when.textContent()) === local, 'the time is shown in the browser zone: ' + (await when.textContent()) + ' vs ' + local);
  check((await when.getAttribute('title')).endsWith(' UTC'), 'UTC on hover');
  const bt = (await apiCall(page, 'GET', '/tasks?vm=' + VM + '&kind=backup')).body.pop();
  say('backed-up', { id: first, ms: Date.now() - t0, task_ms: bt.ended_ms - bt.started_ms, seen_after_end_ms: Date.now() - bt.ended_ms });

  // Restore it through the page into the restore directory.
  // Escape closes a dialog without doing anything.
  await b.locator('button[aria-label^="Restore backup"]').click();
  await page.keyboard.press('Escape');
  await until(async () => !(await page.locator('#dialog[open]').count()), 'Escape to close the dialog');
  await b.locator('button[aria-label^="Restore backup"]').click();
  await allLabelled(page, 'the Restore dialog');
  check((await page.textContent('#restore-warning')).includes('cannot be undone'), 'the restore warning says it cannot be undone');
  await page.check('input[name="restore-mode"][value="file"]');
  await page.fill('#restore-file', 'restored.img');
  const r0 = Date.now();
  await page.click('#restore-confirm');
  const rt = await taskEnded(page, VM, 'restore', r0 - 1000);
  check(rt.state === 'ok', 'the restore ended ok: ' + JSON.stringify(rt.outcome));
  say('restored', { to: env.HF_RESTORE_DIR + '/restored.img', task: rt.id });

  // A second backup fills the slots: Create Backup is disabled, with the reason.
  await page.waitForSelector('#create-backup:not([disabled])');
  await createBackup(page);
  await until(async () => (await page.locator('tr[data-backup]').count()) === 2, 'the second backup', 120_000);
  await until(async () => (await page.textContent('#slot-counter')) === '2 / 2', 'the counter to say 2 / 2');
  await until(() => page.locator('#create-backup').isDisabled(), 'Create Backup to be disabled when full');
  const reason = await page.textContent('#create-reason');
  check(/slots are used/.test(reason), 'the reason says the slots are full: ' + reason);
  say('full', { reason });

  // A VM whose disk was removed: its backup fails, red, with the message.
  await page.goto(env.HF_URL + '/#/vms/' + BROKEN);
  await page.waitForSelector('#create-backup:not([disabled])');
  await createBackup(page, false); // it may fail before a live row is drawn
  await page.waitForSelector('tr.failed .dot.red', { timeout: 60_000 });
  const message = (await page.textContent('tr.failed .error-message')).trim();
  check(message.length > 10, 'the failed backup shows its message: ' + message);
  say('failed', { message });
  await page.goto(env.HF_URL + '/#/vms');
  await page.waitForSelector('tr[data-vm="' + VM + '"] .slots:has-text("2 / 2")');
  await shots(page, 'vm-list');
  await logout(page);

  // A viewer: lists only, no control that changes anything, and the API refuses anyway.
  await login(page, env.HF_VIEWER, env.HF_VIEWER_PASSWORD);
  await page.waitForSelector('tr[data-vm="' + VM + '"]');
  check((await page.locator('tr[data-vm]').count()) === 1, 'a viewer sees only their VM');
  const mutating = 'main button, #create-backup, #take-snapshot, [aria-label^="Restore"], [aria-label^="Delete"], '
    + '[aria-label^="Revert"], [aria-label^="Rename"], [aria-label^="Protect"], [aria-label^="Unprotect"], [aria-label^="Cancel"]';
  for (const where of ['#/vms', '#/vms/' + VM, '#/vms/' + VM + '/snapshots', '#/tasks']) {
    await page.goto(env.HF_URL + '/' + where);
    await page.waitForSelector('main[data-ready="' + where + '"]');
    await page.waitForTimeout(300);
    const n = await page.locator(mutating).count();
    check(n === 0, 'no mutating control for a viewer on ' + where + ' (found ' + n + ')');
  }
  await page.goto(env.HF_URL + '/#/vms/' + VM);
  await page.waitForSelector('tr[data-backup]');
  check((await page.locator('tr[data-backup]').count()) === 2, 'a viewer sees the backups');
  await page.goto(env.HF_URL + '/#/vms/' + VM + '/snapshots');
  await page.waitForSelector('#no-snapshots');
  check((await page.textContent('#no-snapshots')).includes('Ask an operator'), 'the empty tab says whom to ask');
  const forged = await apiCall(page, 'POST', '/vms/' + VM + '/backups', {});
  check(forged.status === 403 && forged.body.error.code === 'forbidden', 'a forged backup is refused: ' + JSON.stringify(forged));
  const forgedDelete = await apiCall(page, 'DELETE', '/vms/' + VM + '/backups/' + first);
  check(forgedDelete.status === 403 && forgedDelete.body.error.code === 'forbidden', 'a forged delete is refused: ' + JSON.stringify(forgedDelete));
  const noCsrf = await page.evaluate(async (vm) => (await fetch('/api/v1/vms/' + vm + '/backups', { method: 'POST' })).status, VM);
  check(noCsrf === 403, 'a request without the CSRF token is refused');
  say('viewer', { forged: forged.status });
  await done();
});
