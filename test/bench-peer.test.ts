// The peer benchmark's reference script (services/bench/peer/mixtral_forward.py) implements Mixtral on
// its own; its NumPy path runs here (PyTorch is not installed on every machine) and must give our logits.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { MixtralModel } from '../services/core/model/model.js';
import { saveModel } from '../services/core/checkpoint/model.js';
import { runPeer } from '../services/bench/peer.js';

await initBackend();
const root = await mkdtemp(join(tmpdir(), 'switchyard-peer-test-'));
after(() => rm(root, { recursive: true, force: true }));

test('the peer reference script computes our logits (NumPy path, tiny model)', async () => {
  const model = MixtralModel.initialize(preset('tiny').model, 13);
  try {
    await saveModel(join(root, 'tiny'), model);
    const [batch, tokens] = [2, 24];
    const ids = Int32Array.from({ length: batch * tokens }, (_, i) => (i * 53 + 7) % 259);
    const ours = await model.logits(ids, batch, tokens);
    const peer = await runPeer(join(root, 'tiny'), ids, batch, tokens, 1, 'numpy');
    assert.equal(peer.logits.length, ours.length);
    let maxDiff = 0;
    for (let i = 0; i < ours.length; i++) maxDiff = Math.max(maxDiff, Math.abs(ours[i] - peer.logits[i]));
    assert.ok(maxDiff < 1e-4, `max |Δ logit| ${maxDiff}`);
  } finally {
    model.dispose();
  }
});
