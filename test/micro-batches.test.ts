// Ping-pong micro-batches in one process: splitting a serving step, an inference forward or a training
// pass into lanes changes no result (logits within 1e-6, losses and gradients within 1e-6 relative),
// for a dropless and a capacity-limited gate, with training noise drawn as one undivided pass draws it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend } from '../services/core/backend.js';
import { parseModelConfig, preset, type ModelConfig } from '../services/core/config.js';
import { Rng } from '../services/core/data/random.js';
import { MixtralModel } from '../services/core/model/model.js';
import { ComputeTurns, lanesFor, splitLanes } from '../services/core/model/pipeline.js';
import { PagedDecoder } from './support/paged.js';
import { relative } from './support/compare.js';

await initBackend();

const tiny = preset('tiny').model;
const idsOf = (count: number, seed: number) => {
  const rng = new Rng(seed);
  return Int32Array.from({ length: count }, () => 32 + Math.floor(rng.next() * 90));
};

test('splitLanes: contiguous, non-empty ranges of nearly equal weight covering every unit', () => {
  assert.deepEqual(splitLanes(5, 1), [[0, 5]]);
  assert.deepEqual(splitLanes(4, 2), [[0, 2], [2, 4]]);
  assert.deepEqual(splitLanes(1, 4), [[0, 1]]);
  assert.deepEqual(splitLanes(3, 3), [[0, 1], [1, 2], [2, 3]]);
  // One heavy unit (a prompt chunk) and light ones (decodes): the heavy one gets a lane of its own.
  assert.deepEqual(splitLanes(5, 2, (u) => (u === 0 ? 100 : 1)), [[0, 1], [1, 5]]);
  for (let units = 1; units < 12; units++)
    for (let lanes = 1; lanes < 6; lanes++) {
      const ranges = splitLanes(units, lanes, (u) => 1 + (u % 3));
      assert.equal(ranges[0][0], 0);
      assert.equal(ranges.at(-1)![1], units);
      ranges.forEach(([a, b], i) => {
        assert.ok(b > a);
        if (i > 0) assert.equal(a, ranges[i - 1][1]);
      });
      assert.equal(ranges.length, Math.min(units, lanes));
    }
});

test('lanesFor: a split only where every lane brings each expert enough rows', () => {
  assert.equal(lanesFor(8, 2, 8, 2, 4), 1, 'a decode step of 8 sequences: 2 rows per expert');
  assert.equal(lanesFor(32, 2, 8, 2, 4), 2, 'a decode step of 32 sequences: 8 rows per expert');
  assert.equal(lanesFor(32, 4, 8, 2, 4), 2);
  assert.equal(lanesFor(4096, 4, 8, 2, 4), 4);
  assert.equal(lanesFor(4096, 1, 8, 2, 4), 1);
  assert.equal(lanesFor(3, 4, 64, 8, 0), 4, '0: always the lanes asked for');
});

test('ComputeTurns: lanes compute one at a time, and a failing lane stops the others and frees finished results', async () => {
  let inside = 0;
  let most = 0;
  const order: string[] = [];
  await ComputeTurns.run(3, async (lane, turns) => {
    for (let layer = 0; layer < 3; layer++) {
      inside++;
      most = Math.max(most, inside);
      order.push(`${lane}:${layer}`);
      inside--;
      await turns.away(new Promise((r) => setTimeout(r, 2)));
    }
  });
  assert.equal(most, 1);
  assert.equal(order.length, 9);
  // Lane 0 does not run all its layers before the others start: they interleave.
  assert.notDeepEqual(order.slice(0, 3), ['0:0', '0:1', '0:2']);
  const discarded: number[] = [];
  await assert.rejects(ComputeTurns.run(3, async (lane, turns) => {
    if (lane === 1) throw new Error('lane 1 broke');
    if (lane === 2) await turns.away(new Promise((r) => setTimeout(r, 5)));
    return lane;
  }, (done) => discarded.push(done)), /lane 1 broke/);
  assert.deepEqual(discarded, [0]);
});

for (const policy of ['mixtral', 'gshard'] as const)
  test(`a serving step in 1, 2 and 4 lanes: the same logits within 1e-6 (${policy}, decodes and prompt chunks together)`, async () => {
    const config: ModelConfig = parseModelConfig({ ...tiny, switchyard_gate: { policy } });
    const model = MixtralModel.initialize(config, 5);
    model.minExpertRowsPerLane = 0; // these steps are small: split them anyway
    const results: Float32Array[][] = [];
    for (const lanes of [1, 2, 4]) {
      model.microBatches = lanes;
      const paged = new PagedDecoder(model, 4);
      // Step 1: five prompts of different lengths; step 2: their first decode plus two new prompts.
      const first = await paged.step([3, 9, 1, 6, 12].map((n, seq) => ({ seq, ids: idsOf(n, seq) })), 'a');
      const second = await paged.step([
        ...first.map((_, seq) => ({ seq, ids: Int32Array.of(40 + seq) })),
        { seq: 5, ids: idsOf(7, 5) }, { seq: 6, ids: idsOf(2, 6) },
      ], 'b');
      results.push([...first, ...second]);
    }
    for (const got of results.slice(1)) got.forEach((l, i) => assert.ok(relative(l, results[0][i]) <= 1e-6, `row ${i}: ${relative(l, results[0][i])}`));
    model.dispose();
  });

test('an inference forward (OIP infer) in 2 lanes: the same logits and routing counts', async () => {
  const model = MixtralModel.initialize(parseModelConfig(tiny), 6);
  model.minExpertRowsPerLane = 0;
  const ids = idsOf(4 * 10, 9);
  const one = await model.logitsWithRouting(ids, 4, 10, 'one');
  model.microBatches = 2;
  const two = await model.logitsWithRouting(ids, 4, 10, 'two');
  assert.ok(relative(two.logits, one.logits) <= 1e-6);
  two.routing.forEach((s, l) => assert.deepEqual([...s.countsAfterDrop], [...one.routing[l].countsAfterDrop]));
  model.dispose();
});

for (const gate of [{ policy: 'mixtral' }, { policy: 'gshard', jitter_eps: 0.01, second_expert_sampling: true }] as const)
  test(`a training pass in 2 and 4 lanes of whole routing groups: loss, aux, z and every gradient within 1e-6 relative (${JSON.stringify(gate)})`, async () => {
    const config = parseModelConfig({ ...tiny, switchyard_gate: gate });
    const batch = 4;
    const tokens = 8;
    const ids = idsOf(batch * tokens, 1);
    const targets = idsOf(batch * tokens, 2);
    const runs = [];
    for (const lanes of [1, 2, 4]) {
      const model = MixtralModel.initialize(config, 3);
      model.microBatches = lanes;
      model.minExpertRowsPerLane = 0;
      const rng = new Rng(11);
      const result = await model.lossAndGradients(ids, targets, batch, tokens, { passId: 'p', train: true, groupTokens: tokens, random: () => rng.next() });
      const grads = new Map<string, Float32Array>();
      for (const [which, table] of [['dense', model.dense], ['experts', model.localExperts!.params]] as const)
        grads.set(which, table.flatGrads());
      runs.push({ result, grads });
      model.dispose();
    }
    const [one, ...split] = runs;
    for (const run of split) {
      for (const key of ['loss', 'crossEntropy', 'auxLoss', 'zLoss'] as const)
        assert.ok(Math.abs(run.result[key] - one.result[key]) <= 1e-6 * Math.abs(one.result[key]) + 1e-9, `${key}: ${run.result[key]} vs ${one.result[key]}`);
      for (const [name, g] of one.grads) assert.ok(relative(run.grads.get(name)!, g) <= 1e-6, `${name}: ${relative(run.grads.get(name)!, g)}`);
    }
  });

test('a training pass whose routing group is the whole batch runs as one lane (capacity gates keep their groups)', async () => {
  const config = parseModelConfig({ ...tiny, num_experts_per_tok: 1, switchyard_gate: { policy: 'switch', use_rts: false } });
  const model = MixtralModel.initialize(config, 3);
  model.minExpertRowsPerLane = 0;
  const ids = idsOf(32, 1);
  const once = await model.lossAndGradients(ids, idsOf(32, 2), 4, 8, { passId: 'one', train: true, groupTokens: 0 });
  model.microBatches = 4;
  const split = await model.lossAndGradients(ids, idsOf(32, 2), 4, 8, { passId: 'four', train: true, groupTokens: 0 });
  assert.equal(split.layerStats[0].plans.length, 1, 'one routing group, as with one lane');
  assert.equal(split.loss, once.loss);
  model.dispose();
});
