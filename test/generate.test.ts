import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend } from '../services/core/backend.js';
import { preset } from '../services/core/config.js';
import { generate } from '../services/router/scheduler.js';
import { MixtralModel } from '../services/core/model/model.js';

await initBackend();
const tiny = preset('tiny');

test('greedy generation equals the argmax of full recomputation at every step', async () => {
  const model = MixtralModel.initialize(tiny.model, 3);
  const prompt = Int32Array.from([72, 101, 108, 108, 111]);
  const out = await generate(model, prompt, { maxTokens: 8, temperature: 0, topP: 1, seed: 0, stopIds: [] });
  assert.equal(out.ids.length, 8);
  let seq = Array.from(prompt);
  for (const id of out.ids) {
    const logits = await model.logits(Int32Array.from(seq), 1, seq.length);
    const last = logits.subarray(logits.length - tiny.model.vocab_size);
    let best = 0;
    for (let i = 1; i < last.length; i++) if (last[i] > last[best]) best = i;
    assert.equal(id, best);
    seq = [...seq, id];
  }
  model.dispose();
});

test('sampling is reproducible by seed and stops at the context limit', async () => {
  const model = MixtralModel.initialize(tiny.model, 4);
  const prompt = Int32Array.from([65, 66]);
  const o = { maxTokens: 10, temperature: 1, topP: 0.9, seed: 11, stopIds: [] };
  const a = await generate(model, prompt, o);
  const b = await generate(model, prompt, o);
  const c = await generate(model, prompt, { ...o, seed: 12 });
  assert.deepEqual(a.ids, b.ids);
  assert.notDeepEqual(a.ids, c.ids);
  const long = await generate(model, prompt, { ...o, maxTokens: 1000 });
  assert.equal(long.finishReason, 'length');
  assert.equal(prompt.length + long.ids.length, tiny.model.max_position_embeddings + 1);
  await assert.rejects(generate(model, prompt, { ...o, temperature: -1 }), /temperature/);
  await assert.rejects(generate(model, prompt, { ...o, topP: 0 }), /top_p/);
  await assert.rejects(generate(model, new Int32Array(0), o), /at least one token/);
  model.dispose();
});
