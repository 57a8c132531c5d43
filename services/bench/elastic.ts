// elastic suite: (1) the planner on recorded routing traces — the demand of every (layer, expert) while
// the `small` model reads held-out text; plans made from the first half of the trace are scored on the
// second half, against the default spread and the lower bound; (2) seconds from an empty shard's
// registration to the first row it serves, in a live cluster under load (target < 10 s), and what the
// load clients got back meanwhile (target: no failures other than 503).
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { preset } from '../core/config.js';
import { loadModel } from '../core/checkpoint/model.js';
import { BatchSampler, loadCorpus, splitCorpus } from '../core/data/corpus.js';
import { MixtralModel } from '../core/model/model.js';
import { expertKeys, expertKeyText, spreadExperts, type ExpertKey } from '../core/placement.js';
import { familyOf } from '../core/model/family.js';
import { checkpointDirOf } from '../core/train/trainer.js';
import { maxOverMean, placementLoad, planPlacement } from '../coordinator/planner.js';
import { until } from '../core/until.js';
import { withSmallCluster } from './local-cluster.js';
import { median, report, type BenchRow } from './report.js';

/** The model `npm start` trains, when it exists: its routing is what real traffic looks like. */
const TRAINED = checkpointDirOf('checkpoints/default');

interface Trace { traffic: string; halves: [Float64Array, Float64Array]; keys: ExpertKey[]; moeLayers: readonly number[]; experts: number }

/** The routing demand of the model reading `text` (8 sequences a batch), split into two halves of the batches. */
async function recordTrace(model: MixtralModel, traffic: string, text: Uint8Array, quick: boolean): Promise<Trace> {
  const keys = expertKeys(familyOf(model.config).moeLayers, familyOf(model.config).experts);
  const index = new Map(keys.map((k, i) => [expertKeyText(k), i]));
  const E = familyOf(model.config).experts;
  const t = preset('small').train;
  const sampler = new BatchSampler(text, t.seq_len, 8, 77);
  const batches = quick ? 8 : 32;
  const halves: [Float64Array, Float64Array] = [new Float64Array(keys.length), new Float64Array(keys.length)];
  let half = 0;
  model.onRouting = (layer, stats) => {
    for (let e = 0; e < E; e++) halves[half][index.get(expertKeyText({ layer, expert: e }))!] += stats.countsBeforeDrop[e];
  };
  for (let b = 0; b < batches; b++) {
    half = b < batches / 2 ? 0 : 1;
    const batch = sampler.next();
    await model.evalLoss(batch.inputs, batch.targets, 8, t.seq_len);
  }
  model.onRouting = undefined;
  return { traffic, halves, keys, moeLayers: familyOf(model.config).moeLayers, experts: E };
}

/** Two recorded workloads: held-out book text, and skewed traffic (one sentence over and over). */
async function recordTraces(quick: boolean): Promise<{ traces: Trace[]; source: string }> {
  const small = preset('small');
  const trained = existsSync(join(TRAINED, 'config.json'));
  const model = trained ? await loadModel(TRAINED) : MixtralModel.initialize(small.model, 4);
  try {
    const { validation } = splitCorpus((await loadCorpus()).bytes, small.train.validation_fraction);
    const repeated = new TextEncoder().encode('Call me Ishmael. '.repeat(4096));
    return {
      traces: [await recordTrace(model, 'book text', validation, quick), await recordTrace(model, 'one sentence repeated', repeated, quick)],
      source: trained ? `trained ${TRAINED}` : 'small, random weights (run `npm start` first for a trained model)',
    };
  } finally {
    model.dispose();
  }
}

function plannerRows(trace: Trace): BenchRow[] {
  const { traffic, keys, moeLayers, experts, halves: [fit, held] } = trace;
  const n = keys.length;
  const rows: BenchRow[] = [];
  for (const shards of [2, 4, 8]) {
    for (const budget of [0, Math.ceil(n / shards) + 1]) {
      const empty = Array.from({ length: shards }, (_, i) => ({ shardId: `s${i}`, maxExperts: budget, holds: [] as ExpertKey[] }));
      const plan = planPlacement({ experts: keys, shards: empty, load: fit });
      const planned = maxOverMean(placementLoad(plan.assignment, keys, held).values());
      const spread = maxOverMean(placementLoad(new Map(spreadExperts(moeLayers, experts, shards).map((held, i) => [`s${i}`, held])), keys, held).values());
      // Lower bound on the held-out half: no shard below the mean, no expert split over more copies than slots allow.
      const onHeld = planPlacement({ experts: keys, shards: empty, load: held });
      const bound = onHeld.lowerBound / onHeld.mean;
      const label = `${traffic}, ${shards} shards, ${budget ? `≤ ${budget} experts each` : 'no memory limit'}`;
      rows.push({ name: `${label}: default spread max/mean (held-out half)`, value: spread, unit: 'ratio', anchor: bound, ratio: spread / bound });
      // The target is against the spread; how far the plan is from the best possible is the next row.
      rows.push({ name: `${label}: planner max/mean (held-out half)`, value: planned, unit: 'ratio', anchor: spread, ratio: planned / spread, target: '<= 1', met: planned <= spread + 1e-9 });
      rows.push({ name: `${label}: planner max/mean vs the lower bound (held-out half)`, value: planned, unit: 'ratio', anchor: bound, ratio: planned / bound });
      rows.push({ name: `${label}: planner max/mean (same half it planned on)`, value: onHeld.predictedMax / onHeld.mean, unit: 'ratio', anchor: bound, ratio: onHeld.predictedMax / onHeld.lowerBound });
    }
  }
  return rows;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function gauge(url: string, name: string): Promise<number> {
  const text = await (await fetch(url)).text();
  const m = text.match(new RegExp(`^${name} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : 0;
}

/** What the load clients got back while shards were added: 200, 503 (shed), anything else (failed). */
interface ClientOutcomes { served: number; refused: number; failed: number }

/** Registration → first served row of shards added one after another to a cluster under load. */
async function scaleUpSeconds(quick: boolean): Promise<{ firstRow: number[]; ready: number[]; clients: ClientOutcomes }> {
  const firstRow: number[] = [];
  const ready: number[] = [];
  const clients: ClientOutcomes = { served: 0, refused: 0, failed: 0 };
  let stop = false;
  await withSmallCluster('elastic', async (cluster) => {
    const url = `${cluster.routerUrls[0]}/v1/completions`;
    // Never rejects: every outcome is counted, so `load` cannot become an unhandled rejection.
    const client = async (w: number) => {
      for (let i = 0; !stop; i++) {
        const status = await fetch(url, {
          method: 'POST', headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ prompt: `Client ${w}: Call me Ishmael.`, max_tokens: 16, temperature: 0.8, seed: w * 1000 + i }),
        }).then(async (r) => { await r.arrayBuffer(); return r.status; }).catch(() => 0);
        if (status === 200) clients.served++;
        else if (status === 503) clients.refused++;
        else clients.failed++;
        // A refused or broken request comes back at once: back off rather than spin on the cores being measured.
        if (status !== 200) await sleep(50);
      }
    };
    const load = Promise.all(Array.from({ length: 4 }, (_, w) => client(w)));
    try {
      await sleep(2_000);
      const coordinatorMetrics = cluster.metricsUrls[0];
      for (let i = 0; i < (quick ? 1 : 3); i++) {
        const metrics = await cluster.startShard(`added-${i}`, 'none');
        firstRow.push(await until(`added-${i}'s first served row`, async () => {
          const seconds = await gauge(metrics, 'switchyard_expert_first_row_seconds');
          return seconds > 0 ? seconds : undefined;
        }, 60_000, 200));
        const sum = await gauge(coordinatorMetrics, 'switchyard_shard_ready_seconds_sum');
        ready.push(sum - ready.reduce((a, b) => a + b, 0));
      }
    } finally {
      stop = true; // the clients stop before the cluster does, also after an error
      await load;
    }
  });
  return { firstRow, ready, clients };
}

export async function elasticSuite(quick: boolean): Promise<void> {
  const { traces, source } = await recordTraces(quick);
  const rows = traces.flatMap(plannerRows);
  const { firstRow, ready, clients } = await scaleUpSeconds(quick);
  const firstRowSeconds = median(firstRow);
  const requests = clients.served + clients.refused + clients.failed;
  rows.push({ name: 'empty shard: registration → in the placement (median)', value: median(ready), unit: 's' });
  // Target < 10 s, as a ratio of those 10 s.
  rows.push({ name: 'empty shard: registration → first served row (median)', value: firstRowSeconds, unit: 's', anchor: 10, ratio: firstRowSeconds / 10, target: '< 1', met: firstRowSeconds < 10 });
  rows.push({ name: 'load clients meanwhile: failed requests (not 200/503)', value: clients.failed, unit: 'requests', anchor: requests, ratio: clients.failed / requests, target: '= 0', met: clients.failed === 0 });
  await report('elastic', rows, { traces: source, moeLayers: traces[0].moeLayers, experts: traces[0].experts, addedShards: firstRow.length, firstRowSeconds: firstRow, readySeconds: ready, clients, quick });
}
