import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repoRoot } from './support/paths.js';

test('the gate is importable as switchyard/gating with the documented API', async () => {
  const gating = await import('switchyard/gating');
  const logits = Float32Array.from([2, 1, 0, 0, 1, 2]);
  const plan = gating.routeTokens(logits, 2, 3, { kind: 'mixtral', k: 2 });
  assert.deepEqual(Array.from(plan.expert), [0, 1, 2, 1]);
  assert.ok(Math.abs(plan.weight[0] + plan.weight[1] - 1) < 1e-6);
  assert.ok(plan.slot instanceof Int32Array && plan.countsBeforeDrop instanceof Int32Array);
});

test('package.json declares the bin, the exports map and optional native backends', async () => {
  const pkg = JSON.parse(await readFile(join(repoRoot, 'package.json'), 'utf8'));
  assert.equal(pkg.name, 'switchyard');
  assert.equal(pkg.type, 'module');
  assert.ok(pkg.bin.switchyard);
  assert.ok(pkg.exports['./gating']);
  assert.ok(pkg.optionalDependencies['@tensorflow/tfjs-node']);
  assert.ok(pkg.optionalDependencies['@tensorflow/tfjs-node-gpu']);
  assert.equal(pkg.scripts.start, 'node dist/services/cli/main.js up');
});

test('the main entry point exposes the shared core', async () => {
  const core = await import('switchyard');
  for (const name of ['MixtralModel', 'ExpertSet', 'InProcessTransport', 'AdamW', 'train', 'generate', 'initBackend', 'parseModelConfig'])
    assert.equal(typeof (core as Record<string, unknown>)[name], 'function', name);
  assert.equal(typeof core.gating.routeTokens, 'function');
});
