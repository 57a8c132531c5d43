import { test } from 'node:test';
import { mulberry32 } from './support/mulberry32.js';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fixturePath } from './support/paths.js';
import { gateSettingsSchema } from '../services/core/config.js';
import {
  capacityFor,
  gateBackward,
  gumbelNoise,
  multiplicativeJitter,
  policyFromSettings,
  pooledAuxLoss,
  pooledAuxTotals,
  routeTokens,
  rtsUniforms,
  updateBalanceBias,
  zLoss,
  type GatePolicy,
  type RoutingPlan,
} from '../services/core/gating/index.js';

const EPS32 = 2 ** -23;
const fround = Math.fround;

// ---------------------------------------------------------------------------------------------------
// helpers


function normal(random: () => number): number {
  const u = 1 - random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * random());
}

function randomLogits(S: number, E: number, random: () => number, scale = 1.5): Float32Array {
  const x = new Float32Array(S * E);
  for (let i = 0; i < x.length; i++) x[i] = scale * normal(random);
  return x;
}

/** |actual − expected| ≤ 2e-6 + 1e-5·|expected|, the conformance tolerance */
function closeTo(actual: number, expected: number, what: string): void {
  assert.ok(
    Math.abs(actual - expected) <= 2e-6 + 1e-5 * Math.abs(expected),
    `${what}: got ${actual}, expected ${expected}`,
  );
}

function softmax64(x: ArrayLike<number>, row: number, E: number): { p: Float64Array; lse: number } {
  let max = -Infinity;
  for (let e = 0; e < E; e++) max = Math.max(max, x[row + e]);
  const p = new Float64Array(E);
  let sum = 0;
  for (let e = 0; e < E; e++) {
    p[e] = Math.exp(x[row + e] - max);
    sum += p[e];
  }
  for (let e = 0; e < E; e++) p[e] /= sum;
  return { p, lse: max + Math.log(sum) };
}

/** float32 sum of the kept probabilities in choice order, −1 if none kept (the forward's clamp input) */
function keptSum32(plan: RoutingPlan, s: number): number {
  let sum = 0;
  let kept = false;
  for (let c = 0; c < plan.k; c++) {
    const i = s * plan.k + c;
    if (plan.slot[i] < 0) continue;
    sum = fround(sum + plan.probs[s * plan.experts + plan.expert[i]]);
    kept = true;
  }
  return kept ? sum : -1;
}

// ---------------------------------------------------------------------------------------------------
// 1. DeepSpeed conformance vectors

interface VectorRun {
  fn: string;
  params: Record<string, unknown>;
  capacity: number;
  l_aux: number;
  exp_counts: number[];
  choice: Array<number | number[]>;
  entries: Array<[number, number, number, number]>;
  tie_dependent?: boolean;
  kept_matches_first_come?: boolean;
  noisy_logits?: number[][];
}
interface VectorCase {
  id: string;
  S: number;
  E: number;
  logits: number[][];
  runs: VectorRun[];
}

const KNOWN_PARAMS = new Set([
  'capacity_factor',
  'min_capacity',
  'drop_tokens',
  'use_rts',
  'noisy_gate_policy',
  'used_token',
  'top2_2nd_expert_sampling',
]);

function policyForRun(run: VectorRun, c: VectorCase, logits: Float32Array): GatePolicy {
  const params = run.params;
  for (const key of Object.keys(params)) {
    assert.ok(KNOWN_PARAMS.has(key), `${c.id}: unhandled DeepSpeed parameter ${key}`);
  }
  // parameters this gate does not implement must be at their neutral values
  // (an RTS run would need DeepSpeed's uniforms, which the vectors do not record; RTS is tested below)
  assert.ok(params.use_rts === undefined || params.use_rts === false, `${c.id}: use_rts run without its uniforms`);
  assert.ok(params.noisy_gate_policy == null, `${c.id}: noisy_gate_policy is not supported`);
  assert.ok(params.used_token == null, `${c.id}: used_token is not supported`);
  assert.equal(typeof params.capacity_factor, 'number');
  assert.equal(typeof params.min_capacity, 'number');
  assert.equal(typeof params.drop_tokens, 'boolean');
  const policy: GatePolicy = {
    kind: run.fn === 'top1gating' ? 'switch' : 'gshard',
    capacityFactor: params.capacity_factor as number,
    minCapacity: params.min_capacity as number,
    dropTokens: params.drop_tokens as boolean,
  };
  assert.ok(run.fn === 'top1gating' || run.fn === 'top2gating', `${c.id}: unknown fn ${run.fn}`);
  if (params.top2_2nd_expert_sampling === true) {
    assert.equal(run.fn, 'top2gating');
    assert.ok(run.noisy_logits, `${c.id}: sampling run without noisy_logits`);
    const noisy = Float32Array.from(run.noisy_logits.flat(), fround);
    assert.equal(noisy.length, logits.length);
    const noise = new Float32Array(noisy.length);
    for (let i = 0; i < noise.length; i++) noise[i] = noisy[i] - logits[i]; // float32 subtraction
    for (let i = 0; i < noise.length; i++) {
      assert.equal(fround(logits[i] + noise[i]), noisy[i], `${c.id}: noise does not reproduce noisy_logits`);
    }
    policy.secondChoiceNoise = noise;
  } else {
    assert.ok(run.noisy_logits === undefined, `${c.id}: noisy_logits on a run without sampling`);
  }
  return policy;
}

test('DeepSpeed conformance vectors (top1gating → switch, top2gating → gshard)', (t) => {
  const file = JSON.parse(readFileSync(fixturePath('gating-vectors.json'), 'utf8')) as {
    cases: VectorCase[];
  };
  assert.equal(file.cases.length, 36);
  let exact = 0;
  let byInvariants = 0;
  let sampling = 0;
  for (const c of file.cases) {
    assert.equal(c.logits.length, c.S);
    const logits = Float32Array.from(c.logits.flat(), fround);
    assert.equal(logits.length, c.S * c.E);
    for (const run of c.runs) {
      const where = `${c.id} ${run.fn}`;
      const policy = policyForRun(run, c, logits);
      if (policy.secondChoiceNoise) sampling++;
      const plan = routeTokens(logits, c.S, c.E, policy);
      const k = plan.k;

      assert.equal(plan.capacity, run.capacity, `${where}: capacity`);
      assert.deepEqual(Array.from(plan.countsBeforeDrop), run.exp_counts, `${where}: exp_counts`);
      assert.equal(run.choice.length, c.S);
      for (let s = 0; s < c.S; s++) {
        const expected = run.choice[s];
        const chosen = Array.from(plan.expert.subarray(s * k, s * k + k));
        assert.deepEqual(chosen, typeof expected === 'number' ? [expected] : expected, `${where}: choice of ${s}`);
      }
      closeTo(plan.auxLoss, run.l_aux, `${where}: l_aux`);

      // our filled entries as DeepSpeed lists them: nonzero combine weights, sorted by (s, e, c)
      const ours: Array<[number, number, number, number]> = [];
      for (let i = 0; i < c.S * k; i++) {
        if (plan.slot[i] >= 0 && plan.weight[i] !== 0) {
          ours.push([Math.floor(i / k), plan.expert[i], plan.slot[i], plan.weight[i]]);
        }
      }
      ours.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);

      if (!run.tie_dependent) {
        if (run.fn === 'top1gating') assert.equal(run.kept_matches_first_come, true, `${where}: flag`);
        assert.equal(ours.length, run.entries.length, `${where}: number of entries`);
        for (let j = 0; j < ours.length; j++) {
          const [s, e, slot, w] = run.entries[j];
          assert.deepEqual(ours[j].slice(0, 3), [s, e, slot], `${where}: entry ${j}`);
          closeTo(ours[j][3], w, `${where}: weight of (${s}, ${e}, ${slot})`);
        }
        exact++;
      } else {
        // top-1 with an overflowing expert: DeepSpeed's survivors came from torch.topk tie-breaking.
        assert.equal(run.fn, 'top1gating', `${where}: tie_dependent is a top-1 flag`);
        const C = plan.capacity;
        const dsKept = new Int32Array(c.E);
        const dsWeight = new Map<number, number>();
        for (const [s, e, slot, w] of run.entries) {
          assert.equal(run.choice[s], e, `${where}: DeepSpeed entry of ${s} on an expert it did not choose`);
          assert.ok(slot >= 0 && slot < C);
          dsKept[e]++;
          dsWeight.set(s, w);
        }
        const seen = new Int32Array(c.E);
        let overflowed = false;
        for (let e = 0; e < c.E; e++) {
          const expectedKept = Math.min(run.exp_counts[e], C);
          if (run.exp_counts[e] > C) overflowed = true;
          assert.equal(dsKept[e], expectedKept, `${where}: DeepSpeed kept count of expert ${e}`);
          assert.equal(plan.countsAfterDrop[e], expectedKept, `${where}: kept count of expert ${e}`);
        }
        assert.ok(overflowed, `${where}: tie_dependent run without an overflowing expert`);
        // first-come rule: the first C tokens (token order) of each expert survive, slots in token order
        for (let s = 0; s < c.S; s++) {
          const e = plan.expert[s];
          const rank = seen[e]++;
          if (rank < C) {
            assert.equal(plan.slot[s], rank, `${where}: slot of token ${s}`);
            closeTo(plan.weight[s], softmax64(logits, s * c.E, c.E).p[e], `${where}: weight of ${s}`);
            const w = dsWeight.get(s);
            if (w !== undefined) closeTo(plan.weight[s], w, `${where}: weight of ${s} vs DeepSpeed`);
          } else {
            assert.equal(plan.slot[s], -1, `${where}: token ${s} should be dropped`);
            assert.equal(plan.weight[s], 0);
          }
        }
        byInvariants++;
      }
    }
  }
  assert.equal(exact + byInvariants, 72);
  t.diagnostic(
    `conformance: ${exact} runs matched exactly, ${byInvariants} tie-dependent runs by invariants, ` +
      `${sampling} with second-expert sampling`,
  );
});

// ---------------------------------------------------------------------------------------------------
// 2. properties on random logits against a naive reference

interface ReferencePlan {
  capacity: number;
  expert: number[];
  slot: number[];
  countsBefore: number[];
  countsAfter: number[];
}

/** Sort-based reference of the selection and slot rules (uses the plan's float32 probs for ties). */
function referenceRoute(
  logits: Float32Array,
  probs: Float32Array,
  S: number,
  E: number,
  policy: GatePolicy,
  k: number,
): ReferencePlan {
  const bias = policy.selectionBias;
  const noise = policy.secondChoiceNoise;
  const expert: number[] = [];
  for (let s = 0; s < S; s++) {
    const firstScore = (e: number): number => (bias ? fround(probs[s * E + e] + bias[e]) : probs[s * E + e]);
    let first = 0;
    for (let e = 1; e < E; e++) if (firstScore(e) > firstScore(first)) first = e;
    const score = (e: number): number => {
      if (bias) return fround(probs[s * E + e] + bias[e]);
      if (policy.kind === 'mixtral') return probs[s * E + e];
      if (noise) return fround(logits[s * E + e] + noise[s * E + e]);
      return logits[s * E + e];
    };
    const rest = [...Array(E).keys()].filter((e) => e !== first);
    rest.sort((a, b) => score(b) - score(a) || a - b);
    expert.push(first, ...rest.slice(0, k - 1));
  }
  const countsBefore = new Array<number>(E).fill(0);
  for (const e of expert) countsBefore[e]++;
  let capacity: number;
  if (policy.kind === 'mixtral' || policy.dropTokens === false) {
    capacity = Math.max(0, ...countsBefore);
  } else {
    const f = fround(k * (policy.capacityFactor ?? 1));
    capacity = Math.max(Math.ceil(fround(fround(S / E) * f)), policy.minCapacity ?? 4);
  }
  const slot = new Array<number>(S * k).fill(-1);
  const countsAfter = new Array<number>(E).fill(0);
  for (let e = 0; e < E; e++) {
    let position = 0;
    for (let c = 0; c < k; c++) {
      for (let s = 0; s < S; s++) {
        if (expert[s * k + c] !== e) continue;
        if (position < capacity) {
          slot[s * k + c] = position;
          countsAfter[e]++;
        }
        position++;
      }
    }
  }
  return { capacity, expert, slot, countsBefore, countsAfter };
}

function checkPlan(logits: Float32Array, S: number, E: number, policy: GatePolicy, plan: RoutingPlan): void {
  const k = plan.k;
  const where = `${policy.kind} k=${k} S=${S} E=${E} cf=${policy.capacityFactor} drop=${policy.dropTokens}`;
  assert.equal(plan.tokens, S);
  assert.equal(plan.experts, E);
  assert.equal(plan.expert.length, S * k);
  assert.equal(plan.slot.length, S * k);
  assert.equal(plan.weight.length, S * k);
  assert.equal(plan.probs.length, S * E);

  // probs: float32 softmax
  for (let s = 0; s < S; s++) {
    const { p } = softmax64(logits, s * E, E);
    for (let e = 0; e < E; e++) {
      assert.ok(Math.abs(plan.probs[s * E + e] - p[e]) <= 1e-7 + 1e-6 * p[e], `${where}: probs[${s},${e}]`);
    }
  }

  // exact agreement with the naive reference
  const ref = referenceRoute(logits, plan.probs, S, E, policy, k);
  assert.equal(plan.capacity, ref.capacity, `${where}: capacity`);
  assert.deepEqual(Array.from(plan.expert), ref.expert, `${where}: experts`);
  assert.deepEqual(Array.from(plan.slot), ref.slot, `${where}: slots`);
  assert.deepEqual(Array.from(plan.countsBeforeDrop), ref.countsBefore, `${where}: countsBeforeDrop`);
  assert.deepEqual(Array.from(plan.countsAfterDrop), ref.countsAfter, `${where}: countsAfterDrop`);

  // invariants stated directly
  const slotsOf: Array<Array<{ s: number; c: number; slot: number }>> = Array.from({ length: E }, () => []);
  const before = new Int32Array(E);
  for (let s = 0; s < S; s++) {
    const chosen = new Set<number>();
    for (let c = 0; c < k; c++) {
      const i = s * k + c;
      const e = plan.expert[i];
      assert.ok(e >= 0 && e < E);
      assert.ok(!chosen.has(e), `${where}: token ${s} chose expert ${e} twice`);
      chosen.add(e);
      before[e]++;
      if (plan.slot[i] >= 0) slotsOf[e].push({ s, c, slot: plan.slot[i] });
      else assert.equal(plan.weight[i], 0, `${where}: dropped choice with a weight`);
    }
  }
  assert.deepEqual(Array.from(plan.countsBeforeDrop), Array.from(before));
  for (let e = 0; e < E; e++) {
    const rows = slotsOf[e];
    assert.ok(rows.length <= plan.capacity, `${where}: expert ${e} over capacity`);
    assert.equal(plan.countsAfterDrop[e], rows.length, `${where}: countsAfterDrop[${e}]`);
    const slots = rows.map((r) => r.slot).sort((a, b) => a - b);
    assert.deepEqual(slots, [...Array(rows.length).keys()], `${where}: slots of ${e} not dense and unique`);
    // choice-major: every choice-c slot is below every choice-(c+1) slot; token order within a choice
    for (const a of rows) {
      for (const b of rows) {
        if (a.c < b.c || (a.c === b.c && a.s < b.s)) assert.ok(a.slot < b.slot, `${where}: slot order on ${e}`);
      }
    }
  }
  const dropless = policy.kind === 'mixtral' || policy.dropTokens === false;
  if (dropless) {
    assert.ok(plan.slot.every((x) => x >= 0), `${where}: dropless plan dropped a choice`);
    assert.equal(plan.capacity, Math.max(0, ...plan.countsBeforeDrop));
  }

  // weights
  for (let s = 0; s < S; s++) {
    const { p } = softmax64(logits, s * E, E);
    if (policy.kind === 'switch') {
      if (plan.slot[s] >= 0) closeTo(plan.weight[s], p[plan.expert[s]], `${where}: weight ${s}`);
      continue;
    }
    const sum32 = keptSum32(plan, s);
    if (sum32 < 0) continue;
    const denom = Math.max(sum32, EPS32);
    let total = 0;
    for (let c = 0; c < k; c++) {
      const i = s * k + c;
      if (plan.slot[i] < 0) continue;
      closeTo(plan.weight[i], plan.probs[s * E + plan.expert[i]] / denom, `${where}: weight ${s}/${c}`);
      total += plan.weight[i];
    }
    if (policy.kind === 'mixtral') assert.ok(Math.abs(total - 1) <= 1e-6, `${where}: mixtral weights sum ${total}`);
    else if (sum32 >= EPS32) assert.ok(Math.abs(total - 1) <= 1e-6, `${where}: kept weights sum ${total}`);
  }

  // aux loss: top1/top2gating count first choices (me·ce summed, ·E); DeepSpeed topkgating (k > 2) takes ce
  // from the k-hot mask and l_aux = mean_e(me·ce)·E·E/k; HF Mixtral sums the k one-hot fractions (·E)
  const kHot = policy.kind === 'mixtral' || (policy.kind === 'topk' && k > 2);
  const n = new Float64Array(E);
  for (let s = 0; s < S; s++) {
    if (kHot) for (let c = 0; c < k; c++) n[plan.expert[s * k + c]]++;
    else n[plan.expert[s * k]]++;
  }
  const meanP = new Float64Array(E);
  for (let s = 0; s < S; s++) {
    const { p } = softmax64(logits, s * E, E);
    for (let e = 0; e < E; e++) meanP[e] += p[e] / S;
  }
  let aux = 0;
  if (policy.kind === 'topk' && k > 2) {
    for (let e = 0; e < E; e++) aux += (meanP[e] * (n[e] / S)) / E;
    aux = (aux * E * E) / k;
  } else {
    for (let e = 0; e < E; e++) aux += meanP[e] * (n[e] / S);
    aux *= E;
  }
  assert.ok(Math.abs(plan.auxLoss - aux) <= 1e-6 * Math.max(1, aux), `${where}: aux ${plan.auxLoss} vs ${aux}`);
}

const SHAPES: Array<[number, number]> = [
  [1, 1],
  [1, 4],
  [7, 3],
  [16, 4],
  [64, 8],
  [100, 16],
  [33, 64],
  [256, 64],
];

test('random logits: routing plans match a naive reference and keep every invariant', () => {
  const random = mulberry32(12345);
  let plans = 0;
  for (const [S, E] of SHAPES) {
    for (const scale of [0.3, 2]) {
      const logits = randomLogits(S, E, random, scale);
      for (const cf of [0.25, 1, 1.25, 2]) {
        for (const dropTokens of [true, false]) {
          const minCapacity = Math.floor(random() * 5);
          const policies: GatePolicy[] = [
            { kind: 'switch', capacityFactor: cf, dropTokens, minCapacity },
            { kind: 'gshard', capacityFactor: cf, dropTokens, minCapacity },
          ];
          for (let k = 1; k <= Math.min(4, E); k++) {
            policies.push({ kind: 'topk', k, capacityFactor: cf, dropTokens, minCapacity });
            policies.push({ kind: 'mixtral', k, capacityFactor: cf, dropTokens, minCapacity });
          }
          for (const policy of policies) {
            if (policy.kind === 'gshard' && E < 2) continue;
            checkPlan(logits, S, E, policy, routeTokens(logits, S, E, policy));
            plans++;
          }
        }
      }
    }
  }
  assert.ok(plans > 500);
});

test('ties go to the lowest expert index (torch.argmax on CPU)', () => {
  const logits = new Float32Array([1, 3, 3, 3, /**/ 0, 0, 0, 0, /**/ 2, 5, 2, 5]);
  const gshard = routeTokens(logits, 3, 4, { kind: 'gshard', dropTokens: false });
  assert.deepEqual(Array.from(gshard.expert), [1, 2, 0, 1, 1, 3]);
  const mixtral = routeTokens(logits, 3, 4, { kind: 'mixtral', k: 3 });
  assert.deepEqual(Array.from(mixtral.expert), [1, 2, 3, 0, 1, 2, 1, 3, 0]);
});

test('topk with k=2 is gshard exactly, with and without second-expert noise', () => {
  const random = mulberry32(99);
  for (const [S, E] of SHAPES) {
    if (E < 2) continue;
    const logits = randomLogits(S, E, random);
    const noise = gumbelNoise(S * E, random);
    for (const cf of [0.5, 1, 2]) {
      for (const dropTokens of [true, false]) {
        for (const secondChoiceNoise of [undefined, noise]) {
          const base = { capacityFactor: cf, dropTokens, minCapacity: 2, secondChoiceNoise };
          const a = routeTokens(logits, S, E, { kind: 'gshard', ...base });
          const b = routeTokens(logits, S, E, { kind: 'topk', k: 2, ...base });
          assert.deepEqual({ ...b, kind: 'gshard' }, a);
        }
      }
    }
  }
});

test('secondChoiceNoise picks only the 2nd..kth expert, from fl32(logits + noise)', () => {
  const random = mulberry32(7);
  const S = 200;
  const E = 8;
  const logits = randomLogits(S, E, random);
  const noise = gumbelNoise(S * E, random);
  const quiet = routeTokens(logits, S, E, { kind: 'topk', k: 3, dropTokens: false });
  const noisy = routeTokens(logits, S, E, { kind: 'topk', k: 3, dropTokens: false, secondChoiceNoise: noise });
  let changed = 0;
  for (let s = 0; s < S; s++) {
    assert.equal(noisy.expert[s * 3], quiet.expert[s * 3], 'first choice must ignore the noise');
    const first = noisy.expert[s * 3];
    const scores = [...Array(E).keys()]
      .filter((e) => e !== first)
      .map((e) => ({ e, v: fround(logits[s * E + e] + noise[s * E + e]) }))
      .sort((a, b) => b.v - a.v || a.e - b.e);
    assert.deepEqual([noisy.expert[s * 3 + 1], noisy.expert[s * 3 + 2]], [scores[0].e, scores[1].e]);
    if (noisy.expert[s * 3 + 1] !== quiet.expert[s * 3 + 1]) changed++;
  }
  assert.ok(changed > 20, 'noise should change some second choices');
  checkPlan(logits, S, E, { kind: 'topk', k: 3, dropTokens: false, secondChoiceNoise: noise }, noisy);
});

test('selectionBias changes which experts are chosen, never the weights or the aux probabilities', () => {
  const random = mulberry32(2024);
  const S = 300;
  const E = 16;
  const logits = randomLogits(S, E, random);
  const bias = new Float32Array(E);
  for (let e = 0; e < E; e++) bias[e] = 0.3 * (random() - 0.5);
  for (const kind of ['switch', 'gshard', 'topk', 'mixtral'] as const) {
    const k = kind === 'switch' ? 1 : kind === 'topk' ? 3 : 2;
    const policy: GatePolicy = { kind, k, capacityFactor: 1.25, minCapacity: 1, selectionBias: bias };
    const plain = routeTokens(logits, S, E, { ...policy, selectionBias: undefined });
    const biased = routeTokens(logits, S, E, policy);
    assert.notDeepEqual(Array.from(biased.expert), Array.from(plain.expert), `${kind}: bias had no effect`);
    assert.deepEqual(biased.probs, plain.probs);
    // selection is the top-k of fl32(probs + bias); checkPlan verifies it and the unbiased weights and aux
    checkPlan(logits, S, E, policy, biased);
  }
  // a large bias forces an expert
  const forced = new Float32Array(E);
  forced[5] = 10;
  const plan = routeTokens(logits, S, E, { kind: 'mixtral', k: 2, selectionBias: forced });
  for (let s = 0; s < S; s++) {
    assert.equal(plan.expert[s * 2], 5);
    const p = plan.probs;
    const w = plan.weight;
    const e2 = plan.expert[s * 2 + 1];
    closeTo(w[s * 2], p[s * E + 5] / fround(p[s * E + 5] + p[s * E + e2]), 'forced weight');
  }
});

test('capacityFor follows DeepSpeed _capacity in float32', () => {
  assert.equal(capacityFor(8, 2, 1, 1.0, 1), 4);
  assert.equal(capacityFor(257, 2, 1, 1.0, 1), 129); // 128.5 → 129
  assert.equal(capacityFor(257, 4, 2, 1.0, 1), 129); // 64.25·2
  assert.equal(capacityFor(64, 16, 2, 1.0, 1), 8);
  assert.equal(capacityFor(8, 16, 1, 1.0, 4), 4); // min_capacity
  assert.equal(capacityFor(8, 16, 1, 1.0, 0), 1);
  assert.equal(capacityFor(0, 4, 2, 1.0, 0), 0);
  // float32 product: fl32(1/3)·fl32(3) rounds to exactly 1 in float32, so no spurious ceil to 2
  assert.equal(capacityFor(1, 3, 1, 3, 0), 1);
  // the float32 steps decide the ceil (DeepSpeed: torch.tensor(cf·2) is float32):
  // fl32(12.5 · fl32(2.4)) = 30.000002 → 31, where exact arithmetic gives 30;
  // fl32(25 · fl32(2.2)) = 55 → 55, where float64 gives 55.00000000000001 → 56
  assert.equal(capacityFor(25, 2, 2, 1.2, 0), 31);
  assert.equal(capacityFor(25, 1, 2, 1.1, 0), 55);
});

test('an empty group routes nothing', () => {
  const plan = routeTokens(new Float32Array(0), 0, 8, { kind: 'gshard', minCapacity: 4 });
  assert.equal(plan.expert.length, 0);
  assert.equal(plan.auxLoss, 0);
  assert.equal(plan.capacity, 4);
  assert.deepEqual(Array.from(plan.countsBeforeDrop), new Array(8).fill(0));
  assert.equal(gateBackward(plan, new Float32Array(0), new Float32Array(0), 1, 1).length, 0);
  assert.equal(zLoss(new Float32Array(0), 0, 8), 0);
});

// ---------------------------------------------------------------------------------------------------
// 3. gateBackward against central finite differences of a float64 reference loss

/** float64 loss with the routing decisions (experts, kept/dropped, clamp branch, aux counts) of `plan` */
function referenceLoss(
  x: Float64Array,
  plan: RoutingPlan,
  dWeight: Float32Array,
  auxCoef: number,
  zCoef: number,
  clamped: boolean[],
): number {
  const { tokens: S, experts: E, k } = plan;
  const topkgating = plan.kind === 'topk' && k > 2; // DeepSpeed topkgating: k-hot ce, l_aux·1/k
  const n = new Float64Array(E);
  for (let s = 0; s < S; s++) {
    if (plan.kind === 'mixtral' || topkgating) for (let c = 0; c < k; c++) n[plan.expert[s * k + c]]++;
    else n[plan.expert[s * k]]++;
  }
  let weighted = 0;
  let aux = 0;
  let z = 0;
  for (let s = 0; s < S; s++) {
    const { p, lse } = softmax64(x, s * E, E);
    z += lse * lse;
    for (let e = 0; e < E; e++) aux += p[e] * n[e];
    let D = 0;
    for (let c = 0; c < k; c++) if (plan.slot[s * k + c] >= 0) D += p[plan.expert[s * k + c]];
    for (let c = 0; c < k; c++) {
      const i = s * k + c;
      if (plan.slot[i] < 0) continue;
      const pe = p[plan.expert[i]];
      const w = plan.kind === 'switch' ? pe : clamped[s] ? pe / EPS32 : pe / D;
      weighted += dWeight[i] * w;
    }
  }
  return weighted + (auxCoef * E * aux) / (S * S * (topkgating ? k : 1)) + (zCoef * z) / S;
}

function checkGradient(logits: Float32Array, S: number, E: number, policy: GatePolicy, random: () => number): void {
  const plan = routeTokens(logits, S, E, policy);
  const dWeight = new Float32Array(S * plan.k);
  for (let i = 0; i < dWeight.length; i++) dWeight[i] = normal(random);
  const auxCoef = 0.5 + random();
  const zCoef = 0.1 + random();
  const clamped = [...Array(S).keys()].map((s) => {
    const sum = keptSum32(plan, s);
    return sum >= 0 && sum < EPS32;
  });
  // the forward matches the reference at the unperturbed point
  const x = Float64Array.from(logits);
  const grad = gateBackward(plan, logits, dWeight, auxCoef, zCoef);
  const h = 1e-5;
  const fd = new Float64Array(S * E);
  for (let j = 0; j < S * E; j++) {
    const keep = x[j];
    x[j] = keep + h;
    const up = referenceLoss(x, plan, dWeight, auxCoef, zCoef, clamped);
    x[j] = keep - h;
    const down = referenceLoss(x, plan, dWeight, auxCoef, zCoef, clamped);
    x[j] = keep;
    fd[j] = (up - down) / (2 * h);
  }
  let diff2 = 0;
  let norm2 = 0;
  let maxAbs = 0;
  for (let j = 0; j < fd.length; j++) {
    diff2 += (grad[j] - fd[j]) ** 2;
    norm2 += fd[j] ** 2;
    maxAbs = Math.max(maxAbs, Math.abs(fd[j]));
  }
  const where = `${policy.kind} k=${plan.k} S=${S} E=${E}`;
  assert.ok(norm2 > 0, `${where}: zero gradient`);
  assert.ok(Math.sqrt(diff2 / norm2) <= 1e-3, `${where}: relative error ${Math.sqrt(diff2 / norm2)}`);
  for (let j = 0; j < fd.length; j++) {
    assert.ok(
      Math.abs(grad[j] - fd[j]) <= 1e-3 * (Math.abs(fd[j]) + 1e-3 * maxAbs),
      `${where}: d/dlogit[${j}] = ${grad[j]}, finite differences ${fd[j]}`,
    );
  }
  // the z-loss term alone
  const zOnly = gateBackward(plan, logits, new Float32Array(S * plan.k), 0, 1);
  for (let s = 0; s < S; s++) {
    const { p, lse } = softmax64(logits, s * E, E);
    for (let e = 0; e < E; e++) closeTo(zOnly[s * E + e], (2 * lse * p[e]) / S, 'z-loss gradient');
  }
}

test('gateBackward matches finite differences for every policy', () => {
  const random = mulberry32(4242);
  const shapes: Array<[number, number]> = [
    [6, 3],
    [24, 5],
    [40, 8],
    [20, 64],
  ];
  let cases = 0;
  for (const [S, E] of shapes) {
    const logits = randomLogits(S, E, random, 1.2);
    const bias = new Float32Array(E).map(() => 0.2 * (random() - 0.5));
    const noise = gumbelNoise(S * E, random);
    const policies: GatePolicy[] = [
      { kind: 'switch', capacityFactor: 0.75, minCapacity: 1 },
      { kind: 'switch', dropTokens: false },
      { kind: 'gshard', capacityFactor: 0.5, minCapacity: 0 },
      { kind: 'gshard', capacityFactor: 1.25, minCapacity: 1, secondChoiceNoise: noise },
      { kind: 'gshard', dropTokens: false, selectionBias: bias },
      { kind: 'topk', k: 1, capacityFactor: 0.75, minCapacity: 0 },
      { kind: 'topk', k: 3, capacityFactor: 0.5, minCapacity: 0 },
      { kind: 'topk', k: 4, capacityFactor: 1, minCapacity: 0 },
      { kind: 'switch', capacityFactor: 0.5, minCapacity: 0, selectionUniform: Float64Array.from({ length: S * E }, random) },
      { kind: 'mixtral', k: 1 },
      { kind: 'mixtral', k: 2 },
      { kind: 'mixtral', k: 3, selectionBias: bias },
    ];
    for (const policy of policies) {
      if ((policy.k ?? 2) > E) continue;
      checkGradient(logits, S, E, policy, random);
      cases++;
    }
  }
  assert.ok(cases >= 38);
});

test('gateBackward: dropped first choices, both choices dropped, and the clamp branch', () => {
  const random = mulberry32(11);
  const S = 16;
  const E = 4;
  // every token prefers expert 0 by far; the other experts have probabilities ≈ e^-17 ≈ 4e-8, so a token
  // whose first choice is dropped renormalises over less than 2^-23 and takes the clamp branch
  // (weights p/eps of order 0.1–1, gradients of the same order: the check below is not swamped)
  const logits = new Float32Array(S * E);
  for (let s = 0; s < S; s++) {
    logits[s * E] = 17 + 0.1 * normal(random);
    for (let e = 1; e < E; e++) logits[s * E + e] = 0.3 * normal(random);
  }
  for (const policy of [
    { kind: 'gshard', capacityFactor: 0.25, minCapacity: 0 },
    { kind: 'topk', k: 3, capacityFactor: 0.25, minCapacity: 0 },
    { kind: 'switch', capacityFactor: 0.5, minCapacity: 0 },
  ] as GatePolicy[]) {
    const plan = routeTokens(logits, S, E, policy);
    const k = plan.k;
    let clampedTokens = 0;
    let allDropped = 0;
    for (let s = 0; s < S; s++) {
      const sum = keptSum32(plan, s);
      if (sum < 0) allDropped++;
      else if (sum < EPS32) {
        clampedTokens++;
        for (let c = 0; c < k; c++) {
          const i = s * k + c;
          if (plan.slot[i] >= 0) closeTo(plan.weight[i], plan.probs[s * E + plan.expert[i]] / EPS32, 'clamped w');
        }
      }
    }
    assert.ok(allDropped > 0, `${policy.kind}: no token lost all its choices`);
    if (policy.kind !== 'switch') assert.ok(clampedTokens > 0, `${policy.kind}: clamp branch not exercised`);
    checkPlan(logits, S, E, policy, plan);
    checkGradient(logits, S, E, policy, random);
  }
});

test('zLoss is mean_s logsumexp²', () => {
  const logits = new Float32Array([0, 0, 1, 2, 3, 4]);
  const expected = (Math.log(2) ** 2 + Math.log(Math.exp(1) + Math.exp(2)) ** 2 + Math.log(Math.exp(3) + Math.exp(4)) ** 2) / 3;
  assert.ok(Math.abs(zLoss(logits, 3, 2) - expected) < 1e-12);
});

// ---------------------------------------------------------------------------------------------------
// training extras

test('gumbelNoise, multiplicativeJitter and updateBalanceBias', () => {
  const random = mulberry32(5);
  const g = gumbelNoise(20000, random);
  let mean = 0;
  for (const v of g) {
    assert.ok(Number.isFinite(v));
    mean += v / g.length;
  }
  assert.ok(Math.abs(mean - 0.5772156649) < 0.03, `Gumbel mean ${mean}`);
  assert.equal(gumbelNoise(3, () => 0.5)[0], fround(-Math.log(Math.log(2))));
  assert.ok(Number.isFinite(gumbelNoise(1, () => 0)[0]));
  assert.throws(() => gumbelNoise(1, () => 1), RangeError);

  const rows = new Float32Array(1000);
  const jitter = multiplicativeJitter(rows, 0.01, random);
  assert.equal(jitter.length, rows.length);
  assert.ok(jitter.every((v) => v >= fround(0.99) && v <= fround(1.01)));
  assert.ok(multiplicativeJitter(rows, 0, random).every((v) => v === 1));
  assert.throws(() => multiplicativeJitter(rows, -0.1, random), RangeError);

  const bias = new Float32Array([0, 0, 0, 0]);
  updateBalanceBias(bias, new Int32Array([10, 2, 4, 0]), 0.001); // mean 4
  assert.deepEqual(Array.from(bias), [fround(-0.001), fround(0.001), 0, fround(0.001)]);
  assert.throws(() => updateBalanceBias(bias, new Int32Array(3), 0.001), RangeError);
});

test('aux-loss-free balancing evens out the load of a skewed router', () => {
  const random = mulberry32(77);
  const S = 512;
  const E = 8;
  const logits = randomLogits(S, E, random, 0.5);
  for (let s = 0; s < S; s++) logits[s * E] += 1; // expert 0 is favoured
  const bias = new Float32Array(E);
  const load = (plan: RoutingPlan): number => Math.max(...plan.countsBeforeDrop) / ((S * 2) / E);
  const initial = load(routeTokens(logits, S, E, { kind: 'mixtral', k: 2 }));
  for (let step = 0; step < 300; step++) {
    const plan = routeTokens(logits, S, E, { kind: 'mixtral', k: 2, selectionBias: bias });
    updateBalanceBias(bias, plan.countsBeforeDrop, 0.002);
  }
  const final = load(routeTokens(logits, S, E, { kind: 'mixtral', k: 2, selectionBias: bias }));
  assert.ok(initial > 1.5 && final < 1.15, `max/mean load ${initial} → ${final}`);
});

test('policyFromSettings picks the train or eval capacity factor from the model config', () => {
  const settings = gateSettingsSchema.parse({ policy: 'gshard', capacity_factor: 1.25, eval_capacity_factor: 2, min_capacity: 4, drop_tokens: false });
  assert.deepEqual(policyFromSettings(settings, 2, 'train'), { kind: 'gshard', k: 2, capacityFactor: 1.25, minCapacity: 4, dropTokens: false });
  assert.deepEqual(policyFromSettings(settings, 2, 'eval'), { kind: 'gshard', k: 2, capacityFactor: 2, minCapacity: 4, dropTokens: false });
  const bias = new Float32Array(4);
  assert.equal(policyFromSettings(settings, 2, 'eval', bias).selectionBias, bias);
});

// ---------------------------------------------------------------------------------------------------
// 4. bad inputs

test('bad inputs throw RangeError', () => {
  const logits = new Float32Array(12); // 3 tokens × 4 experts
  const route = (policy: GatePolicy, x: Float32Array = logits, S = 3, E = 4) => () => routeTokens(x, S, E, policy);
  assert.throws(route({ kind: 'gshard' }, new Float32Array(11)), { name: 'RangeError', message: /tokens·experts/ });
  assert.throws(route({ kind: 'gshard' }, logits, 4, 4), RangeError);
  assert.throws(route({ kind: 'topk', k: 5 }), { name: 'RangeError', message: /exceeds the number of experts/ });
  assert.throws(route({ kind: 'mixtral', k: 5 }), RangeError);
  assert.throws(route({ kind: 'topk', k: 0 }), { name: 'RangeError', message: /k must be/ });
  assert.throws(route({ kind: 'topk', k: 1.5 }), RangeError);
  assert.throws(route({ kind: 'gshard', capacityFactor: 0 }), { name: 'RangeError', message: /capacityFactor/ });
  assert.throws(route({ kind: 'gshard', capacityFactor: -1 }), RangeError);
  assert.throws(route({ kind: 'switch', capacityFactor: NaN }), RangeError);
  assert.throws(route({ kind: 'switch', k: 2 }), { name: 'RangeError', message: /'switch'/ });
  assert.throws(route({ kind: 'gshard', k: 1 }), { name: 'RangeError', message: /'gshard'/ });
  assert.throws(route({ kind: 'gshard', k: 3 }), RangeError);
  assert.throws(route({ kind: 'gshard', minCapacity: -1 }), RangeError);
  assert.throws(route({ kind: 'bogus' as 'topk' }), RangeError);
  for (const bad of [NaN, Infinity, -Infinity]) {
    const x = new Float32Array(12);
    x[7] = bad;
    assert.throws(route({ kind: 'mixtral' }, x), { name: 'RangeError', message: /finite/ });
  }
  assert.throws(route({ kind: 'gshard', selectionBias: new Float32Array(3) }), RangeError);
  assert.throws(route({ kind: 'gshard', secondChoiceNoise: new Float32Array(11) }), RangeError);
  assert.throws(route({ kind: 'switch', secondChoiceNoise: new Float32Array(12) }), RangeError);
  assert.throws(route({ kind: 'mixtral', secondChoiceNoise: new Float32Array(12) }), RangeError);
  assert.throws(
    route({ kind: 'gshard', secondChoiceNoise: new Float32Array(12), selectionBias: new Float32Array(4) }),
    RangeError,
  );
  assert.throws(() => routeTokens(new Float32Array(0), 0, 0, { kind: 'switch' }), RangeError);
  assert.throws(() => capacityFor(8, 2, 1, 0, 1), RangeError);

  const plan = routeTokens(logits, 3, 4, { kind: 'gshard' });
  assert.throws(() => gateBackward(plan, logits, new Float32Array(5), 0, 0), RangeError);
  assert.throws(() => gateBackward(plan, new Float32Array(8), new Float32Array(6), 0, 0), RangeError);
  assert.throws(() => zLoss(new Float32Array(5), 2, 3), RangeError);
});

// ---------------------------------------------------------------------------------------------------
// 4. Random Token Selection (DeepSpeed top1gating, use_rts=True)

/**
 * DeepSpeed top1gating's dropping with use_rts, in float64 tensor form: mask1 = one_hot(argmax probs);
 * mask1_rand = mask1·uniform; top_idx = topk(mask1_rand, capacity, dim=0) (equal values: lower row
 * first); new_mask1 = mask1 · scatter(top_idx); locations1 = cumsum(new_mask1, dim=0) − 1.
 * Returns each token's slot (−1 = dropped).
 */
function deepspeedRtsSlots(probs: Float32Array, uniform: ArrayLike<number>, S: number, E: number, capacity: number): number[] {
  const mask1: number[][] = [];
  for (let s = 0; s < S; s++) {
    let best = 0;
    for (let e = 1; e < E; e++) if (probs[s * E + e] > probs[s * E + best]) best = e;
    mask1.push(Array.from({ length: E }, (_, e) => (e === best ? 1 : 0)));
  }
  const newMask = mask1.map((row) => row.map(() => 0));
  const selected = Math.min(capacity, S);
  for (let e = 0; e < E; e++) {
    const column = mask1.map((row, s) => ({ s, v: row[e] * uniform[s * E + e] }));
    column.sort((a, b) => b.v - a.v || a.s - b.s);
    for (const { s } of column.slice(0, selected)) newMask[s][e] = mask1[s][e];
  }
  const slots = new Array<number>(S).fill(-1);
  const cumsum = new Array<number>(E).fill(0);
  for (let s = 0; s < S; s++) {
    for (let e = 0; e < E; e++) {
      cumsum[e] += newMask[s][e];
      if (newMask[s][e]) slots[s] = cumsum[e] - 1;
    }
  }
  return slots;
}

test('Random Token Selection: a hand-computed DeepSpeed top1gating (use_rts) vector', () => {
  // tokens 0..4 choose expert 0, token 5 expert 1; capacity = ceil(6/2 · 0.5) = 2
  const logits = Float32Array.from([2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 0, 2]);
  const uniform = Float64Array.from([0.1, 0.7, 0.9, 0.6, 0.3, 0.5, 0.8, 0.4, 0.2, 0.3, 0.95, 0.5]);
  const policy: GatePolicy = { kind: 'switch', capacityFactor: 0.5, minCapacity: 0 };
  const first = routeTokens(logits, 6, 2, policy);
  const rts = routeTokens(logits, 6, 2, { ...policy, selectionUniform: uniform });
  assert.equal(rts.capacity, 2);
  // without RTS the first two tokens of expert 0 stay; with it the two largest uniforms (tokens 1: 0.9, 3: 0.8),
  // numbered in token order
  assert.deepEqual(Array.from(first.slot), [0, 1, -1, -1, -1, 0]);
  assert.deepEqual(Array.from(rts.slot), [-1, 0, -1, 1, -1, 0]);
  assert.deepEqual(Array.from(rts.expert), [0, 0, 0, 0, 0, 1]);
  const p = fround(Math.exp(2) / (Math.exp(2) + 1));
  for (const [s, w] of [0, p, 0, p, 0, p].entries()) closeTo(rts.weight[s], w, `weight ${s}`);
  assert.deepEqual(Array.from(rts.countsBeforeDrop), [5, 1]);
  assert.deepEqual(Array.from(rts.countsAfterDrop), [2, 1]);
  assert.equal(rts.auxLoss, first.auxLoss, 'l_aux is computed before dropping');
  // equal uniforms: the lower token index wins
  const tied = routeTokens(logits, 6, 2, { ...policy, selectionUniform: new Float64Array(12).fill(0.5) });
  assert.deepEqual(Array.from(tied.slot), [0, 1, -1, -1, -1, 0]);
  // dropless: every token stays, in token order, whatever the uniforms
  const dropless = routeTokens(logits, 6, 2, { kind: 'switch', dropTokens: false, selectionUniform: uniform });
  assert.deepEqual(Array.from(dropless.slot), [0, 1, 2, 3, 4, 0]);
});

test('Random Token Selection matches the DeepSpeed tensor formulation on random logits and uniforms', () => {
  const random = mulberry32(777);
  let dropping = 0;
  for (const [S, E, cf] of [[40, 4, 0.5], [100, 8, 1], [64, 16, 0.25], [9, 3, 2]] as const) {
    const logits = randomLogits(S, E, random, 2);
    const uniform = Float32Array.from({ length: S * E }, random);
    const plan = routeTokens(logits, S, E, { kind: 'switch', capacityFactor: cf, minCapacity: 1, selectionUniform: uniform });
    const want = deepspeedRtsSlots(plan.probs, uniform, S, E, plan.capacity);
    assert.deepEqual(Array.from(plan.slot), want, `S=${S} E=${E} cf=${cf}`);
    for (let s = 0; s < S; s++) assert.equal(plan.weight[s], want[s] >= 0 ? plan.probs[s * E + plan.expert[s]] : 0);
    if (plan.slot.some((x) => x < 0)) dropping++;
    // the RTS plan differs from first-come only in which tokens are kept
    const plain = routeTokens(logits, S, E, { kind: 'switch', capacityFactor: cf, minCapacity: 1 });
    assert.deepEqual(plan.expert, plain.expert);
    assert.deepEqual(plan.countsAfterDrop, plain.countsAfterDrop);
    assert.equal(plan.auxLoss, plain.auxLoss);
  }
  assert.ok(dropping >= 3, 'the cases drop tokens');
});

test('rtsUniforms: a counter-based stream keyed by (seed, step, layer, token, expert)', () => {
  const key = { seed: 1234, step: 7, layer: 2 };
  const S = 64;
  const E = 4;
  const all = rtsUniforms(key, 0, S, E);
  assert.deepEqual(rtsUniforms(key, 0, S, E), all, 'same key, same uniforms');
  // a replica holding tokens 40.. of the batch draws the single-process uniforms of those tokens
  assert.deepEqual(rtsUniforms(key, 40, 24, E), all.subarray(40 * E));
  let sum = 0;
  for (const u of all) {
    assert.ok(u > 0 && u < 1);
    sum += u;
  }
  assert.ok(Math.abs(sum / all.length - 0.5) < 0.05, `mean ${sum / all.length}`);
  for (const other of [{ ...key, seed: 1235 }, { ...key, step: 8 }, { ...key, layer: 3 }, { ...key, seed: 1234 + 2 ** 32 }]) {
    assert.notDeepEqual(rtsUniforms(other, 0, S, E), all, JSON.stringify(other));
  }
  // same seed ⇒ same routing; different seed ⇒ a different kept set
  const logits = randomLogits(S, E, mulberry32(5), 2);
  const route = (seed: number) =>
    routeTokens(logits, S, E, { kind: 'switch', capacityFactor: 0.5, minCapacity: 0, selectionUniform: rtsUniforms({ ...key, seed }, 0, S, E) });
  const a = route(1);
  assert.ok(a.slot.some((x) => x < 0), 'the case drops tokens');
  assert.deepEqual(route(1).slot, a.slot);
  assert.notDeepEqual(Array.from(route(2).slot).map((x) => x >= 0), Array.from(a.slot).map((x) => x >= 0));
  assert.throws(() => rtsUniforms({ ...key, step: -1 }, 0, 1, 1), RangeError);
  assert.throws(() => routeTokens(logits, S, E, { kind: 'gshard', selectionUniform: all }), /switch/);
  assert.throws(() => routeTokens(logits, S, E, { kind: 'switch', selectionUniform: new Float64Array(S * E).fill(1) }), /\[0, 1\)/);
});

// ---------------------------------------------------------------------------------------------------
// 5. DeepSpeed topkgating's aux loss (k > 2) and Hugging Face's whole-batch Mixtral aux loss

test('topk with k > 2: l_aux = mean(me·ce)·E·E/k with ce the mean k-hot mask (DeepSpeed topkgating)', () => {
  // hand-computable: E = 4, k = 3, two tokens; token 0 logits [3,2,1,0] → experts 0,1,2; token 1
  // [0,1,2,3] → experts 3,2,1. ce = [1,2,2,1]/2, me = mean of the two softmax rows = [q0+q3, q1+q2, ...]/2
  const logits = Float32Array.from([3, 2, 1, 0, 0, 1, 2, 3]);
  const plan = routeTokens(logits, 2, 4, { kind: 'topk', k: 3, dropTokens: false });
  const z = Math.exp(3) + Math.exp(2) + Math.exp(1) + 1;
  const q = [Math.exp(3) / z, Math.exp(2) / z, Math.exp(1) / z, 1 / z];
  const me = [q[0] + q[3], q[1] + q[2], q[2] + q[1], q[3] + q[0]].map((v) => v / 2);
  const ce = [1, 2, 2, 1].map((v) => v / 2);
  const want = (me.reduce((acc, m, e) => acc + m * ce[e], 0) / 4) * 16 / 3;
  assert.ok(Math.abs(plan.auxLoss - want) < 1e-7, `${plan.auxLoss} vs ${want}`);
  // first-choice counting (top2gating's) would give 4·(me0·½ + me3·½) instead
  assert.ok(Math.abs(plan.auxLoss - 4 * (me[0] / 2 + me[3] / 2)) > 1e-3);
});

/**
 * Hugging Face modeling_mixtral `load_balancing_loss_func(gate_logits, num_experts, top_k)` with no
 * attention mask, float64: the layers' logits concatenated, softmax, top-k (or the given choices),
 * tokens_per_expert = mean one_hot [k, E], router_prob_per_expert = mean softmax [E],
 * loss = Σ tokens_per_expert · router_prob_per_expert · E.
 */
function hfLoadBalancingLoss(layers: Float64Array[], E: number, k: number, choices?: number[][]): { loss: number; choices: number[][] } {
  const rows: Float64Array[] = [];
  for (const x of layers) for (let s = 0; s < x.length / E; s++) rows.push(x.subarray(s * E, (s + 1) * E));
  const N = rows.length;
  const routing = rows.map((r) => softmax64(r, 0, E).p);
  const selected = choices ?? routing.map((p) => [...Array(E).keys()].sort((a, b) => p[b] - p[a] || a - b).slice(0, k));
  const tokensPerExpert = Array.from({ length: k }, () => new Float64Array(E));
  const routerProb = new Float64Array(E);
  for (let t = 0; t < N; t++) {
    for (let c = 0; c < k; c++) tokensPerExpert[c][selected[t][c]] += 1 / N;
    for (let e = 0; e < E; e++) routerProb[e] += routing[t][e] / N;
  }
  let loss = 0;
  for (let c = 0; c < k; c++) for (let e = 0; e < E; e++) loss += tokensPerExpert[c][e] * routerProb[e];
  return { loss: loss * E, choices: selected };
}

test("aux_loss_scope 'batch': pooled totals give HF load_balancing_loss_func over every layer, with its exact gradient", () => {
  const random = mulberry32(2024);
  const E = 5;
  const k = 2;
  const groupTokens = [7, 7, 3]; // three groups per layer
  const layers = 3;
  const logits: Float32Array[] = []; // one per (layer, group)
  for (let l = 0; l < layers; l++) for (const S of groupTokens) logits.push(randomLogits(S, E, random, 1.5));
  const plans = logits.map((x, i) => routeTokens(x, groupTokens[i % groupTokens.length], E, { kind: 'mixtral', k }));
  const pooled = pooledAuxTotals(plans, E);
  const layerLogits = Array.from({ length: layers }, (_, l) => {
    const parts = logits.slice(l * groupTokens.length, (l + 1) * groupTokens.length);
    return Float64Array.from(parts.flatMap((p) => Array.from(p)));
  });
  const hf = hfLoadBalancingLoss(layerLogits, E, k);
  // the gate's choices are HF's top-k
  assert.deepEqual(plans.flatMap((p) => Array.from(p.expert)), hf.choices.flat());
  const got = pooledAuxLoss(pooled);
  assert.ok(Math.abs(got - hf.loss) <= 1e-6 * hf.loss, `${got} vs ${hf.loss}`);
  // differs from the per-group losses (their mean over groups, summed over layers, the 'group' scope)
  const perGroup = plans.reduce((acc, p) => acc + p.auxLoss, 0) / groupTokens.length;
  assert.ok(Math.abs(perGroup - got) > 1e-3, 'pooled and per-group losses coincide: the test proves nothing');

  // gradient: gateBackward of each group with the pooled totals vs central differences of the HF loss
  const coef = 0.7;
  const h = 1e-6;
  let worst = 0;
  logits.forEach((x, i) => {
    const S = plans[i].tokens;
    const grad = gateBackward(plans[i], x, new Float32Array(S * k), coef, 0, pooled);
    const l = Math.floor(i / groupTokens.length);
    const offset = groupTokens.slice(0, i % groupTokens.length).reduce((a, b) => a + b, 0) * E;
    for (let j = 0; j < S * E; j++) {
      const at = layerLogits[l][offset + j];
      layerLogits[l][offset + j] = at + h;
      const up = hfLoadBalancingLoss(layerLogits, E, k, hf.choices).loss;
      layerLogits[l][offset + j] = at - h;
      const down = hfLoadBalancingLoss(layerLogits, E, k, hf.choices).loss;
      layerLogits[l][offset + j] = at;
      const fd = (coef * (up - down)) / (2 * h);
      worst = Math.max(worst, Math.abs(grad[j] - fd));
      assert.ok(Math.abs(grad[j] - fd) <= 1e-6 + 1e-4 * Math.abs(fd), `group ${i} d/dlogit[${j}] ${grad[j]} vs ${fd}`);
    }
  });
  assert.throws(() => pooledAuxTotals([routeTokens(logits[0], 7, E, { kind: 'gshard' })], E), /Mixtral/);
});
