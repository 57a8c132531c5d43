// Inference when things go wrong, in process: a token's lost choices reroute to different experts, a
// transport that fails leaves no tensors behind, and a failing token callback ends only its own request.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset } from '../services/core/config.js';
import { Scheduler } from '../services/router/scheduler.js';
import { PagedDecoder } from './support/paged.js';
import { pagedAttentionSettings } from '../services/core/model/paged-attention.js';
import { InProcessTransport, type ExpertTransport, type RowBatch } from '../services/core/model/experts.js';
import { MixtralModel } from '../services/core/model/model.js';
import { MoeLayer } from '../services/core/model/moe.js';
import { familyOf } from '../services/core/model/family.js';
import type { Unserved } from '../services/core/overload.js';

await initBackend();
const tiny = preset('tiny').model;

test("reroute sends a token's two lost choices to two different experts, the next best ones", async () => {
  const D = 4;
  const E = 4;
  // Expert e multiplies its rows by e + 1; experts 0 and 1 are out of reach.
  const scaled = (b: RowBatch) => b.rows.map((v) => v * (b.expert + 1));
  const rerouted: Array<{ expert: number; rowCount: number }> = [];
  const transport: ExpertTransport = {
    overflow: 'reroute',
    forward: async () => { throw new Error('inference goes through serve'); },
    backward: async () => { throw new Error('no training here'); },
    serve: async (passId, batches) => {
      if (passId.endsWith('/reroute')) rerouted.push(...batches.map((b) => ({ expert: b.expert, rowCount: b.rowCount })));
      return batches.map((b): Float32Array | Unserved => (b.expert < 2 ? { unserved: `expert ${b.expert} unreachable` } : scaled(b)));
    },
  };
  const moe = new MoeLayer(0, D, E, 2, tiny.switchyard_gate, transport);
  // One token whose gate logits rank the experts 0 > 1 > 2 > 3: it chooses 0 and 1, both lost.
  const h = tf.tensor2d([[1, 0, 0, 0]]);
  const gateW = tf.tensor2d([[3, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]);
  const { y, stats } = await moe.forward(h, gateW, { passId: 'p', train: false, groupTokens: 0 });
  assert.deepEqual(rerouted.sort((a, b) => a.expert - b.expert), [{ expert: 2, rowCount: 1 }, { expert: 3, rowCount: 1 }]);
  // Each choice keeps its own combine weight; the first goes to expert 2 (×3), the second to expert 3 (×4).
  const w0 = 1 / (1 + Math.exp(-1));
  const out = y.dataSync();
  assert.ok(Math.abs(out[0] - (w0 * 3 + (1 - w0) * 4)) < 1e-5, `y[0] = ${out[0]}`);
  assert.deepEqual([...out.slice(1)], [0, 0, 0]);
  assert.deepEqual([...stats.degradedTokens!], [1]);
  tf.dispose([h, gateW, y]);
});

test('a transport that fails at any MoE layer leaves no tensors behind, in a forward and in decode steps', async () => {
  const defaultMacs = pagedAttentionSettings.matMulChunkMacs;
  // Three layers: the failure comes with nothing, some or all of the pass's layers done before it.
  const config = parseModelConfig({ ...tiny, num_hidden_layers: 3 });
  const reference = MixtralModel.initialize(config, 7);
  const local = new InProcessTransport(reference.localExperts!);
  let failing = -1;
  const lost = (batches: RowBatch[]) => batches.some((b) => b.layer === failing);
  // The experts' two ways to fail a serving call: the call rejects, or it comes back with rows nobody
  // served and the overflow policy refuses to answer without them.
  const rejecting: ExpertTransport = {
    forward: (passId, batches, train) => (lost(batches) ? Promise.reject(new Error('experts unreachable')) : local.forward(passId, batches, train)),
    backward: () => Promise.reject(new Error('no training here')),
  };
  const refusing: ExpertTransport = {
    overflow: 'reject',
    forward: () => Promise.reject(new Error('serving goes through serve')),
    backward: () => Promise.reject(new Error('no training here')),
    serve: async (passId, batches) => (lost(batches) ? batches.map(() => ({ unserved: 'no live shard' })) : local.forward(passId, batches, false)),
  };
  const ids = Int32Array.from([72, 101, 108, 108]);
  for (const [name, transport, error] of [['rejects', rejecting, /experts unreachable/], ['leaves rows unserved', refusing, /experts out of reach/]] as const) {
    const model = new MixtralModel(config, transport);
    model.loadDense(reference.toHf());
    failing = -1;
    // Sequences to extend (past > 0), and a prefill chunk through the matMul attention path.
    pagedAttentionSettings.matMulChunkMacs = 1_000; // the 12-token chunk's 4 608, not the 4-token rows' 512
    const paged = new PagedDecoder(model, 4);
    await paged.step([{ seq: 0, ids }, { seq: 1, ids: ids.subarray(0, 3) }], 'prefill');
    const chunk = Int32Array.from({ length: 12 }, (_, i) => 65 + i);
    const fails = async () => {
      await assert.rejects(model.logits(ids, 1, ids.length), error);
      await assert.rejects(paged.step([{ seq: 2, ids }, { seq: 3, ids: chunk }], 'step'), error);
      await assert.rejects(paged.step([{ seq: 0, ids: ids.subarray(0, 1) }, { seq: 1, ids: ids.subarray(1, 3) }], 'next'), error);
    };
    for (const layer of familyOf(config).moeLayers) {
      failing = layer;
      await fails(); // anything built once and kept (e.g. tables) is made by the first call
      const before = tf.memory().numTensors;
      await fails();
      assert.equal(tf.memory().numTensors, before, `the transport ${name} at layer ${layer}: tensors leaked by a failed forward or decode step`);
    }
    model.dispose();
  }
  pagedAttentionSettings.matMulChunkMacs = defaultMacs;
  reference.dispose();
});

test('a request whose token callback throws fails alone; the others in its batch complete', async () => {
  const model = MixtralModel.initialize(tiny, 8);
  const batcher = new Scheduler(model);
  const sampling = { maxTokens: 5, temperature: 0, topP: 1, seed: 0, stopIds: [] };
  // It throws at its second token, in the step the other request joins.
  let tokens = 0;
  const failing = batcher.submit(Int32Array.from([65, 66]), sampling, () => {
    if (++tokens === 2) throw new Error('client went away');
  });
  const healthy = batcher.submit(Int32Array.from([67, 68, 69]), sampling);
  await assert.rejects(failing, /client went away/);
  const done = await healthy;
  assert.deepEqual([done.ids.length, done.finishReason], [5, 'length']);
  assert.ok(batcher.stats.maxSequencesPerStep >= 2, 'both requests ran in one step');
  await batcher.drain();
  model.dispose();
});
