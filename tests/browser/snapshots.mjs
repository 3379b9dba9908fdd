// Snapshots through the page on a running qemu-system VM (tests/dashboard.rs checks QEMU):
// the name rule in the dialog, take (with memory), rename, revert (the disk comes back; the
// snapshot is kept) and delete, then the empty tab again.
import { env, check, say, until, launch, login, shots, sync, apiCall, taskEnded, run, allLabelled } from './lib.mjs';

const VM = env.HF_VM;

async function nameError(page, field, value) {
  await page.fill(field, value);
  return (await page.textContent(field + '-err')).trim();
}

run(async () => {
  const { page, done } = await launch();
  await login(page, env.HF_OPERATOR, env.HF_OPERATOR_PASSWORD);
  await page.goto(env.HF_URL + '/#/vms/' + VM + '/snapshots');
  await page.waitForSelector('#no-snapshots');
  check((await page.textContent('#no-snapshots')).includes('No snapshot exists yet'), 'the empty tab says so');

  // The dialog checks the name as it is typed: a space is refused, PreUpdate is taken.
  await page.click('#take-snapshot');
  await page.waitForSelector('#snapshot-name');
  await allLabelled(page, 'the Take Snapshot dialog');
  const spaced = await nameError(page, '#snapshot-name', 'Pre Update');
  check(spaced.includes('PreUpdate, not Pre Update'), 'a name with a space is refused: ' + spaced);
  check(await page.locator('#snapshot-confirm').isDisabled(), 'Take Snapshot is disabled for a bad name');
  check((await page.getAttribute('#snapshot-name', 'aria-invalid')) === 'true', 'the field is marked invalid');
  check((await nameError(page, '#snapshot-name', 'PreUpdate')) === '', 'PreUpdate is a good name');
  check(await page.locator('#snapshot-confirm').isEnabled(), 'Take Snapshot is enabled for a good name');
  const lifespans = await page.locator('#snapshot-lifespan option').allTextContents();
  check(lifespans[lifespans.length - 1] === '10 days', 'the lifespan goes up to the policy maximum: ' + lifespans);
  await page.fill('#snapshot-description', 'before the kernel update');
  await page.check('#snapshot-memory');
  const t0 = Date.now();
  await page.click('#snapshot-confirm');
  const made = await taskEnded(page, VM, 'snapshot-create', t0 - 1000);
  check(made.state === 'ok', 'the snapshot was taken: ' + JSON.stringify(made.outcome));
  const row = page.locator('tr[data-snapshot="PreUpdate"]');
  await row.waitFor();
  const text = await row.textContent();
  check(text.includes('before the kernel update') && text.includes('Yes'), 'the row shows description and memory: ' + text);
  check(/in (9 d|10 d|\d+ d)/.test(text), 'the row says when it expires: ' + text);
  await allLabelled(page, 'the Snapshots tab');
  await shots(page, 'snapshots');
  await sync('taken'); // the test writes over the disk now

  // Rename: the same rule, then the new name.
  await page.click('[aria-label="Rename snapshot PreUpdate"]');
  const spaced2 = await nameError(page, '#snapshot-new-name', 'Pre Upgrade');
  check(spaced2.includes('No spaces'), 'rename refuses a space: ' + spaced2);
  check(await page.locator('#rename-confirm').isDisabled(), 'Rename is disabled for a bad name');
  await page.fill('#snapshot-new-name', 'PreUpgrade');
  await page.click('#rename-confirm');
  await page.locator('tr[data-snapshot="PreUpgrade"]').waitFor();
  check((await page.locator('tr[data-snapshot="PreUpdate"]').count()) === 0, 'the old name is gone');

  // Revert: confirmed, blue while it runs, and the snapshot is kept.
  await page.click('[aria-label="Revert to snapshot PreUpgrade"]');
  check((await page.textContent('#dialog')).includes('The snapshot is kept'), 'the revert dialog says the snapshot is kept');
  const r0 = Date.now();
  await page.click('#dialog button.danger:has-text("Revert")');
  const reverted = await taskEnded(page, VM, 'snapshot-revert', r0 - 1000);
  check(reverted.state === 'ok', 'the revert ended ok: ' + JSON.stringify(reverted.outcome));
  await page.locator('tr[data-snapshot="PreUpgrade"]').waitFor();
  await sync('reverted'); // the test reads the disk back

  // Delete: confirmed; the tab is empty again.
  await page.waitForSelector('[aria-label="Delete snapshot PreUpgrade"]');
  await page.click('[aria-label="Delete snapshot PreUpgrade"]');
  await page.click('#dialog button.danger:has-text("Delete")');
  await page.waitForSelector('#no-snapshots', { timeout: 60_000 });
  const list = await apiCall(page, 'GET', '/vms/' + VM + '/snapshots');
  check(list.status === 200 && list.body.length === 0, 'no snapshot is left: ' + JSON.stringify(list.body));
  say('deleted');

  // The task list shows who did what.
  await page.goto(env.HF_URL + '/#/tasks');
  await page.waitForSelector('main[data-ready="#/tasks"]');
  const tasks = await page.locator('tbody tr[data-task]').allTextContents();
  for (const k of ['snapshot-create', 'snapshot-rename', 'snapshot-revert', 'snapshot-delete']) {
    check(tasks.some((t) => t.includes(k) && t.includes('ok') && t.includes(env.HF_OPERATOR)), 'the task list shows ' + k);
  }
  await page.locator('tbody tr[data-task] a').first().click();
  await page.waitForSelector('#task-log div');
  await shots(page, 'task');
  await done();
});
