// serving suite (issue 15): the inference engine measured in-process, before and after its rewrite, and
// completions through a local cluster over HTTP.
//
// 1. In-process engine, presets `small` and `medium` (random weights, seed 4), at 1, 8, 32 and 64
//    concurrent greedy requests, each a distinct prompt generating exactly maxTokens ids: aggregate
//    generated tokens/s, latency p50/p99, TTFT p50/p99, median TPOT. Checked: every request returned
//    maxTokens ids, and the first 4 requests of every round returned what their prompt gives alone.
// 2. Prefix reuse (`medium`): TTFT of a 1 500-id prompt, then of the same ids plus 20 more.
// 3. Context curve (`medium`): 32 concurrent requests of L − 16 prompt ids + 16 new ids, median TPOT per L.
// 4. Cluster: `small` (and `medium` in full mode) behind `switchyard up`'s cluster, 2 shards, 1 router.
//
// The engine is reached only through ./serving-engine.ts. Every timed round runs on a fresh engine
// (after a short warm-up request whose ids no prompt shares), so nothing one round leaves behind, such
// as cached prefixes, helps the next.
//
// Environment (both modes): SWITCHYARD_BENCH_CONCURRENCY=1,8 (in-process concurrency list),
// SWITCHYARD_BENCH_ROUNDS=1 (rounds of every timed measurement), SWITCHYARD_BENCH_CONTEXTS=128,512 or
// `none` (the context curve's L values), SWITCHYARD_BENCH_PREFIX_IDS=1000 or `none` (the prefix length).
import { backendInfo, describeBackend, initBackend } from '../core/backend.js';
import { preset } from '../core/config.js';
import { MixtralModel } from '../core/model/model.js';
import { median, report, type BenchRow } from './report.js';
import { stepBreakdown, type StepBreakdown } from './serving-breakdown.js';
import { withLocalCluster, withSmallCluster, type ClusterTimings } from './local-cluster.js';
import { ENGINE_NAME, startEngine, type EngineSampling, type ServingEngine } from './serving-engine.js';

// The prompts' text: the opening of Moby Dick (public domain), ASCII, no digits (the warm-up prompt is
// digits, so no prompt shares a prefix with it). Prompt i is `PROMPT_STRIDE * i` bytes into it, cycling
// through it for prompts longer than the paragraph.
const PARAGRAPH =
  'Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse, ' +
  'and nothing particular to interest me on shore, I thought I would sail about a little and see the watery ' +
  'part of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever ' +
  'I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I ' +
  'find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I ' +
  'meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong moral ' +
  'principle to prevent me from deliberately stepping into the street, and methodically knocking people\'s ' +
  'hats off - then, I account it high time to get to sea as soon as I can. This is my substitute for pistol ' +
  'and ball. With a philosophical flourish Cato throws himself upon his sword; I quietly take to the ship. ' +
  'There is nothing surprising in this. If they but knew it, almost all men in their degree, some time or ' +
  'other, cherish very nearly the same feelings towards the ocean with me. ';
const TEXT = new TextEncoder().encode(PARAGRAPH);
const PROMPT_STRIDE = 17;
/** Distinct prompts there are (at least 64, the largest default concurrency). */
const MAX_CONCURRENCY = Math.floor(TEXT.length / PROMPT_STRIDE);

const textIds = (offset: number, length: number): Int32Array => Int32Array.from({ length }, (_, j) => TEXT[(offset + j) % TEXT.length]);
/** Request i's prompt: distinct for i < MAX_CONCURRENCY. */
const promptIds = (i: number, length: number): Int32Array => textIds(i * PROMPT_STRIDE, length);
const WARM_UP = Int32Array.from(new TextEncoder().encode('0123456789'));

const greedy = (maxTokens: number): EngineSampling => ({ maxTokens, temperature: 0, topP: 1, seed: 0, stopIds: [] });

/** Nearest-rank percentile. */
const percentile = (values: number[], p: number): number => {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
};

// ---------------------------------------------------------------------------------------------------
// Settings

const IN_PROCESS_PRESETS = ['small', 'medium'] as const;
type PresetName = (typeof IN_PROCESS_PRESETS)[number];

interface Settings {
  quick: boolean;
  rounds: number;
  concurrency: number[];
  contexts: number[];
  /** Per preset: prompt ids and new ids per in-process request. */
  shape: Record<PresetName, { promptIds: number; maxTokens: number }>;
  /** 0 = the prefix reuse measure is skipped. */
  prefixIds: number;
  prefixExtraIds: number;
  contextConcurrency: number;
  contextNewIds: number;
}

function envList(name: string): string[] | undefined {
  const raw = process.env[name]?.trim();
  if (raw === undefined || raw === '') return undefined;
  return raw.split(',').map((s) => s.trim());
}

function envInts(name: string, min: number, max: number): number[] | undefined {
  const items = envList(name);
  if (!items) return undefined;
  return items.map((item) => {
    const n = Number(item);
    if (!/^\d+$/.test(item) || n < min || n > max) throw new RangeError(`${name}='${process.env[name]}': '${item}' is not an integer in [${min}, ${max}]`);
    return n;
  });
}

function settings(quick: boolean): Settings {
  const contextNewIds = 16;
  const maxContext = preset('medium').model.max_position_embeddings;
  const contextsEnv = envList('SWITCHYARD_BENCH_CONTEXTS');
  const contexts = contextsEnv?.length === 1 && contextsEnv[0] === 'none'
    ? []
    : // L − 16 prompt ids (≥ 1) and 16 new: the batcher runs a step while past + pending ≤ the context,
      // so the prompt plus all but the last new id must fit: L − 16 + 16 − 1 ≤ max_position_embeddings.
      // Longer contexts by request take minutes of prefill per round (32 × L ids); the step breakdown's
      // context curve covers 128 to 2 048 with the KV blocks filled directly.
      (envInts('SWITCHYARD_BENCH_CONTEXTS', contextNewIds + 1, maxContext) ?? [128]);
  return {
    quick,
    rounds: envInts('SWITCHYARD_BENCH_ROUNDS', 1, 100)?.[0] ?? (quick ? 1 : 3),
    concurrency: envInts('SWITCHYARD_BENCH_CONCURRENCY', 1, MAX_CONCURRENCY) ?? (quick ? [1, 8] : [1, 8, 32, 64]),
    contexts,
    shape: { small: { promptIds: 24, maxTokens: quick ? 8 : 32 }, medium: { promptIds: 32, maxTokens: quick ? 4 : 16 } },
    prefixIds: process.env.SWITCHYARD_BENCH_PREFIX_IDS?.trim() === 'none'
      ? 0
      : (envInts('SWITCHYARD_BENCH_PREFIX_IDS', 1, maxContext - 20)?.[0] ?? (quick ? 128 : 1500)),
    prefixExtraIds: 20,
    // Quick mode: a shape check, not a measurement (32 sequences take seconds a step on today's engine).
    contextConcurrency: quick ? 4 : 32,
    contextNewIds: quick ? 4 : contextNewIds,
  };
}

// ---------------------------------------------------------------------------------------------------
// Timing

interface Timed {
  ids: number[];
  /** Seconds from submit to the answer, and to the first token's callback. */
  latency: number;
  ttft: number;
}

/** Submits at once (synchronously, so a batch of these is queued before any step runs). */
async function timedRequest(engine: ServingEngine, prompt: Int32Array, maxTokens: number): Promise<Timed> {
  let first: number | undefined;
  const t0 = performance.now();
  const { ids } = await engine.submit(prompt, greedy(maxTokens), () => { first ??= performance.now(); });
  const end = performance.now();
  return { ids, latency: (end - t0) / 1000, ttft: first === undefined ? Number.NaN : (first - t0) / 1000 };
}

const log = (line: string): void => { process.stderr.write(`serving: ${line}\n`); };
const secs = (t0: number): number => (performance.now() - t0) / 1000;

/** A fresh engine for one timed measurement, warmed by a short request first. */
async function withEngine<T>(model: MixtralModel, maxSequences: number, fn: (engine: ServingEngine) => Promise<T>): Promise<T> {
  const engine = await startEngine(model, { maxSequences });
  try {
    await engine.submit(WARM_UP, greedy(2), () => undefined);
    return await fn(engine);
  } finally {
    await engine.close();
  }
}

interface RoundStats {
  throughput: number;
  latencyP50: number;
  latencyP99: number;
  ttftP50: number;
  ttftP99: number;
  tpotMedian: number;
}

function roundStats(done: Timed[], wall: number): RoundStats {
  const tokens = done.reduce((n, d) => n + d.ids.length, 0);
  const latencies = done.map((d) => d.latency);
  const ttfts = done.map((d) => d.ttft);
  // Time per output token after the first.
  const tpots = done.filter((d) => d.ids.length > 1).map((d) => (d.latency - d.ttft) / (d.ids.length - 1));
  return {
    throughput: tokens / wall,
    latencyP50: percentile(latencies, 50), latencyP99: percentile(latencies, 99),
    ttftP50: percentile(ttfts, 50), ttftP99: percentile(ttfts, 99),
    tpotMedian: tpots.length ? median(tpots) : Number.NaN,
  };
}

/** A row whose value is the median over rounds (the range kept in the JSON); `scale` converts units. */
function medianRow(name: string, values: number[], unit: string, scale = 1): BenchRow {
  const v = values.map((x) => x * scale);
  return { name, value: median(v), unit, ...(v.length > 1 ? { range: [Math.min(...v), Math.max(...v)] as [number, number] } : {}) };
}

// ---------------------------------------------------------------------------------------------------
// Checks: the bench refuses to report what it did not actually compute.

function checkLengths(label: string, done: Timed[], maxTokens: number): void {
  done.forEach((d, i) => {
    if (d.ids.length !== maxTokens)
      throw new Error(`${label}: request ${i} returned ${d.ids.length} ids, expected exactly ${maxTokens} (stopIds: [], temperature 0)`);
    if (!Number.isFinite(d.ttft)) throw new Error(`${label}: request ${i} never called onToken`);
  });
}

function checkSameAsAlone(label: string, done: Timed[], alone: number[][]): void {
  for (let i = 0; i < Math.min(alone.length, done.length); i++) {
    const got = done[i].ids;
    const want = alone[i];
    const at = want.findIndex((id, j) => got[j] !== id);
    if (at >= 0 || got.length !== want.length)
      throw new Error(`${label}: request ${i}'s greedy output differs from the same prompt generated alone ` +
        `(first difference at token ${at >= 0 ? at : Math.min(got.length, want.length)}): batched [${got.join(',')}] vs alone [${want.join(',')}]`);
  }
}

// How a tfjs wasm kernel fails when the heap cannot grow (malloc returns 0 and the kernel writes there).
const WASM_OUT_OF_MEMORY = /memory access out of bounds|Cannot enlarge memory|out of memory|null function or function signature mismatch/i;

/** The error a failed section ends the suite with; a wasm heap exhaustion is named as such. */
function failure(section: string, err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const hint = WASM_OUT_OF_MEMORY.test(message)
    ? ' (this looks like the wasm backend out of its 4 GB heap: the medium model takes 1.6 GB of it, and about as much again ' +
      'once XNNPACK has packed its weights for matMul; SWITCHYARD_BENCH_PREFIX_IDS, SWITCHYARD_BENCH_CONTEXTS and ' +
      'SWITCHYARD_BENCH_CONCURRENCY make the runs smaller)'
    : '';
  return `serving bench, ${section}: ${message}${hint}`;
}

// ---------------------------------------------------------------------------------------------------
// Sections

type Meta = Record<string, unknown>;
const CHECKED_PROMPTS = 4;
const maxSequencesOf = (s: Settings): number => Math.max(64, ...s.concurrency);

/** What each checked prompt gives alone (one engine, one request at a time). */
async function aloneOutputs(name: PresetName, model: MixtralModel, s: Settings): Promise<number[][]> {
  const { promptIds: promptLength, maxTokens } = s.shape[name];
  return withEngine(model, maxSequencesOf(s), async (engine) => {
    const out: number[][] = [];
    for (let i = 0; i < CHECKED_PROMPTS; i++) {
      const d = await timedRequest(engine, promptIds(i, promptLength), maxTokens);
      checkLengths(`${name} alone, prompt ${i}`, [d], maxTokens);
      out.push(d.ids);
    }
    return out;
  });
}

async function concurrencySection(name: PresetName, model: MixtralModel, s: Settings, alone: number[][], rows: BenchRow[], meta: Meta): Promise<void> {
  const { promptIds: promptLength, maxTokens } = s.shape[name];
  const maxSequences = maxSequencesOf(s);
  const seconds: Record<string, number> = {};
  for (const concurrency of s.concurrency) {
    const t0 = performance.now();
    const label = `${name} in-process, ${concurrency} concurrent`;
    const stats: RoundStats[] = [];
    for (let r = 0; r < s.rounds; r++) {
      const { done, wall } = await withEngine(model, maxSequences, async (engine) => {
        const start = performance.now();
        const done = await Promise.all(Array.from({ length: concurrency }, (_, i) => timedRequest(engine, promptIds(i, promptLength), maxTokens)));
        return { done, wall: secs(start) };
      });
      checkLengths(`${label}, round ${r + 1}`, done, maxTokens);
      checkSameAsAlone(`${label}, round ${r + 1}`, done, alone);
      stats.push(roundStats(done, wall));
      log(`${label}, round ${r + 1}/${s.rounds}: ${wall.toFixed(1)} s, ${stats.at(-1)!.throughput.toFixed(1)} tokens/s`);
    }
    rows.push(
      medianRow(`${label}: throughput`, stats.map((x) => x.throughput), 'tokens/s'),
      medianRow(`${label}: latency p50`, stats.map((x) => x.latencyP50), 's'),
      medianRow(`${label}: latency p99`, stats.map((x) => x.latencyP99), 's'),
      medianRow(`${label}: TTFT p50`, stats.map((x) => x.ttftP50), 'ms', 1000),
      medianRow(`${label}: TTFT p99`, stats.map((x) => x.ttftP99), 'ms', 1000),
      medianRow(`${label}: TPOT median`, stats.map((x) => x.tpotMedian), 'ms', 1000),
      // Decode-phase aggregate (what llama.cpp's eval rate reports): sequences over the time per output token.
      medianRow(`${label}: decode throughput (concurrency / TPOT)`, stats.map((x) => concurrency / x.tpotMedian), 'tokens/s'),
    );
    seconds[`${concurrency} concurrent`] = secs(t0);
  }
  meta[`${name} in-process`] = { promptIds: promptLength, maxTokens, concurrency: s.concurrency, maxSequences, checkedPrompts: CHECKED_PROMPTS, seconds };
}

async function prefixSection(model: MixtralModel, s: Settings, rows: BenchRow[], meta: Meta): Promise<void> {
  const first: number[] = [];
  const second: number[] = [];
  for (let r = 0; r < s.rounds; r++) {
    // A different prefix each round (on a fresh engine anyway); the 20 more ids come from elsewhere in the text.
    const prefix = textIds(5 + 101 * r, s.prefixIds);
    const extended = new Int32Array(s.prefixIds + s.prefixExtraIds);
    extended.set(prefix);
    extended.set(textIds(5 + 101 * r + 555, s.prefixExtraIds), s.prefixIds);
    const [a, b] = await withEngine(model, 64, async (engine) => {
      const a = await timedRequest(engine, prefix, 1);
      const b = await timedRequest(engine, extended, 1);
      return [a, b];
    });
    checkLengths(`prefix reuse, round ${r + 1}`, [a, b], 1);
    first.push(a.ttft);
    second.push(b.ttft);
    log(`medium prefix reuse, round ${r + 1}/${s.rounds}: TTFT ${a.ttft.toFixed(2)} s, then ${b.ttft.toFixed(2)} s`);
  }
  const ratios = first.map((f, i) => f / second[i]);
  const ratio = median(ratios);
  const label = 'medium in-process, prefix reuse';
  rows.push(
    medianRow(`${label}: TTFT, ${s.prefixIds}-id prompt`, first, 's'),
    medianRow(`${label}: TTFT, same ${s.prefixIds} ids + ${s.prefixExtraIds}`, second, 's'),
    { ...medianRow(`${label}: first TTFT / second`, ratios, '×'), ratio, target: '>= 5', met: ratio >= 5 },
  );
  meta['medium prefix reuse'] = { prefixIds: s.prefixIds, extraIds: s.prefixExtraIds, maxTokens: 1, order: 'the prefix alone, then prefix + 20 ids, one after the other on a fresh engine' };
}

async function contextSection(model: MixtralModel, s: Settings, rows: BenchRow[], meta: Meta): Promise<void> {
  const n = s.contextConcurrency;
  const seconds: Record<string, number> = {};
  for (const L of s.contexts) {
    const t0 = performance.now();
    const promptLength = L - 16;
    const label = `medium in-process, ${n} concurrent, context ${L}`;
    const stats: RoundStats[] = [];
    for (let r = 0; r < s.rounds; r++) {
      const { done, wall } = await withEngine(model, n, async (engine) => {
        const start = performance.now();
        const done = await Promise.all(Array.from({ length: n }, (_, i) => timedRequest(engine, promptIds(i, promptLength), s.contextNewIds)));
        return { done, wall: secs(start) };
      });
      checkLengths(`${label}, round ${r + 1}`, done, s.contextNewIds);
      stats.push(roundStats(done, wall));
      log(`${label}, round ${r + 1}/${s.rounds}: ${wall.toFixed(1)} s`);
    }
    rows.push(
      medianRow(`${label}: TPOT median`, stats.map((x) => x.tpotMedian), 'ms', 1000),
      medianRow(`${label}: TTFT p50`, stats.map((x) => x.ttftP50), 's'),
    );
    seconds[`L=${L}`] = secs(t0);
  }
  meta['medium context curve'] = { contexts: s.contexts, promptIds: 'L - 16', newIds: s.contextNewIds, concurrency: n, seconds };
}

/**
 * Where a decode step's time goes (step vs its matMuls alone; issue 15: ≤ 1.5× at 32 sequences), then
 * the decode step from context 128 to 2 048 at 32 sequences, with random K/V in the blocks (prefilling
 * 32 × 2 048 tokens would take minutes): its growth against attention's linear share.
 */
async function breakdownSection(model: MixtralModel, s: Settings, rows: BenchRow[], meta: Meta): Promise<void> {
  const sequences = s.quick ? 8 : 32;
  const reps = s.quick ? 2 : 5;
  const b = await stepBreakdown(model, sequences, s.quick ? 32 : 64, reps);
  if (!b.checked) throw new Error('step breakdown: a timed step gave other logits than the reference step');
  const label = `medium step breakdown, ${sequences} sequences at context ${b.context}`;
  const ratio = b.stepMs / b.matmulsAloneMs;
  rows.push(
    { name: `${label}: step`, value: b.stepMs, unit: 'ms' },
    { name: `${label}: its matMuls alone`, value: b.matmulsAloneMs, unit: 'ms' },
    { name: `${label}: step / matMuls alone`, value: ratio, unit: '×', ratio, target: '<= 1.5', met: ratio <= 1.5 },
    { name: `${label}: host attention`, value: b.attentionMs, unit: 'ms' },
    { name: `${label}: feed-forward (gate, experts, combine)`, value: b.feedForwardMs, unit: 'ms' },
  );
  const curve: StepBreakdown[] = [];
  for (const L of s.quick ? [128] : [128, 512, 1024, 2048]) {
    const point = await stepBreakdown(model, sequences, L - 1, s.quick ? 1 : 3, false);
    if (!point.checked) throw new Error(`context curve at ${L}: a timed step gave other logits than the reference step`);
    curve.push(point);
  }
  const first = curve[0];
  // Linear in attention: the step at L is the step at 128 plus attention scaled by the keys read.
  for (const p of curve) {
    const predicted = first.stepMs + first.attentionMs * ((p.context + 1) / (first.context + 1) - 1);
    const growth = p.stepMs / predicted;
    rows.push(
      { name: `medium decode step, ${sequences} sequences, context ${p.context + 1}: step`, value: p.stepMs, unit: 'ms' },
      { name: `medium decode step, ${sequences} sequences, context ${p.context + 1}: host attention`, value: p.attentionMs, unit: 'ms' },
      { name: `medium decode step, ${sequences} sequences, context ${p.context + 1}: step / linear-attention prediction`, value: growth, unit: '×', ratio: growth, target: '<= 1.1', met: growth <= 1.1 },
    );
  }
  meta['medium step breakdown'] = { sequences, reps, breakdown: b, curve, curveKv: 'random K/V written into the blocks (no prefill)' };
}

async function clusterRows(name: string, url: string, concurrencies: number[], promptLength: number, maxTokens: number, s: Settings, rows: BenchRow[]): Promise<Record<string, number>> {
  const complete = async (i: number): Promise<{ seconds: number; tokens: number }> => {
    const t0 = performance.now();
    const res = await fetch(`${url}/v1/completions`, {
      // The default 30 s deadline is too short for `medium` on today's engine.
      method: 'POST', headers: { 'content-type': 'application/json', 'x-request-timeout-ms': '600000' },
      body: JSON.stringify({ prompt: new TextDecoder().decode(Uint8Array.from(promptIds(i, promptLength))), max_tokens: maxTokens, temperature: 0, seed: 0 }),
    });
    const body = (await res.json()) as { usage?: { completion_tokens: number }; choices?: Array<{ finish_reason: string }> };
    if (res.status !== 200) throw new Error(`${name}: completion failed: ${res.status} ${JSON.stringify(body)}`);
    const tokens = body.usage?.completion_tokens;
    const finish = body.choices?.[0]?.finish_reason;
    // The HTTP API stops at the tokenizer's stop ids, so fewer tokens are allowed, but only with 'stop'.
    if (tokens === undefined || tokens > maxTokens || (tokens < maxTokens && finish !== 'stop'))
      throw new Error(`${name}: asked for ${maxTokens} tokens, got ${tokens} (finish_reason ${finish})`);
    return { seconds: secs(t0), tokens };
  };
  await complete(MAX_CONCURRENCY - 1); // warm-up
  const seconds: Record<string, number> = {};
  for (const concurrency of concurrencies) {
    const t0 = performance.now();
    const label = `${name}, ${concurrency} concurrent`;
    const rates: number[] = [];
    const perRequest: number[] = [];
    const p50: number[] = [];
    const p99: number[] = [];
    for (let r = 0; r < s.rounds; r++) {
      const start = performance.now();
      const done = await Promise.all(Array.from({ length: concurrency }, (_, i) => complete(i)));
      const wall = secs(start);
      const tokens = done.reduce((n, d) => n + d.tokens, 0);
      rates.push(tokens / wall);
      perRequest.push(tokens / concurrency);
      p50.push(percentile(done.map((d) => d.seconds), 50));
      p99.push(percentile(done.map((d) => d.seconds), 99));
      log(`${label}, round ${r + 1}/${s.rounds}: ${wall.toFixed(1)} s, ${rates.at(-1)!.toFixed(1)} tokens/s`);
    }
    rows.push(
      medianRow(`${label}: throughput`, rates, 'tokens/s'),
      medianRow(`${label}: tokens per request`, perRequest, 'tokens'),
      medianRow(`${label}: latency p50`, p50, 's'),
      medianRow(`${label}: latency p99`, p99, 's'),
    );
    seconds[`${concurrency} concurrent`] = secs(t0);
  }
  return seconds;
}

export async function servingSuite(quick: boolean): Promise<void> {
  await initBackend();
  const s = settings(quick);
  // In-process rows first, then the cluster's, whatever order the sections ran in.
  const rows: BenchRow[] = [];
  const cluster: BenchRow[] = [];
  const sectionSeconds: Record<string, number> = {};
  const meta: Meta = {
    engine: ENGINE_NAME, backend: describeBackend(backendInfo()), quick, rounds: s.rounds, weights: 'random, MixtralModel.initialize(preset, 4)',
    prompts: `distinct slices of one English paragraph (bytes), request i starting ${PROMPT_STRIDE} × i bytes in`,
    sampling: 'greedy (temperature 0); in-process stopIds [] so every request generates exactly maxTokens',
    definitions: {
      throughput: 'generated tokens of the round / its wall time (submit of the first to the last answer)',
      TTFT: 'submit → first token callback', TPOT: '(latency − TTFT) / (tokens − 1), median over requests',
      rounds: 'each row is the median over rounds (range in the JSON); every round runs on a fresh, warmed-up engine',
    },
    sectionSeconds,
  };
  let current = 'setup';
  const section = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    current = name;
    const t0 = performance.now();
    const out = await fn();
    sectionSeconds[name] = secs(t0);
    log(`${name}: ${sectionSeconds[name].toFixed(1)} s`);
    return out;
  };
  const t0 = performance.now();
  // The medium model stays for the cluster and the context curve; the context curve comes last, as the
  // slowest section and the one most likely to exhaust today's engine's wasm heap.
  let medium: MixtralModel | undefined;
  try {
    for (const name of IN_PROCESS_PRESETS) {
      const model = await section(`${name} random weights`, async () => MixtralModel.initialize(preset(name).model, 4));
      if (name === 'medium') medium = model;
      try {
        const alone = await section(`${name} in-process, prompts alone`, () => aloneOutputs(name, model, s));
        // Before the concurrent rounds: today's engine runs close to the wasm heap's limit on long prompts.
        if (name === 'medium' && s.prefixIds > 0) await section('medium prefix reuse', () => prefixSection(model, s, rows, meta));
        await section(`${name} in-process, concurrent`, () => concurrencySection(name, model, s, alone, rows, meta));
      } finally {
        if (model !== medium) model.dispose();
      }
    }
    if (s.prefixIds === 0) meta['medium prefix reuse'] = { skipped: 'SWITCHYARD_BENCH_PREFIX_IDS=none' };
    const clusters: Record<string, unknown> = {};
    meta.cluster = clusters;
    const smallTokens = quick ? 16 : 48;
    const small = await section('small cluster', () => withSmallCluster('serving', (c) =>
      clusterRows('small cluster', c.routerUrls[0], quick ? [1, 8] : [1, 8, 32], 24, smallTokens, s, cluster)));
    clusters.small = { shards: 2, routers: 1, promptIds: 24, maxTokens: smallTokens, seconds: small };
    const model = medium!;
    if (!quick) {
      const timings: ClusterTimings = {};
      const times = await section('medium cluster', () => withLocalCluster('serving', model, 1, (c) =>
        clusterRows('medium cluster', c.routerUrls[0], [1, 8], 32, 16, s, cluster), timings));
      clusters.medium = { shards: 2, routers: 1, promptIds: 32, maxTokens: 16, checkpointSaveSeconds: timings.saveSeconds, clusterUpSeconds: timings.upSeconds, seconds: times };
      log(`medium cluster: checkpoint saved in ${timings.saveSeconds?.toFixed(1)} s, cluster up (loading it) in ${timings.upSeconds?.toFixed(1)} s`);
    }
    await section('medium step breakdown', () => breakdownSection(model, s, rows, meta));
    if (s.contexts.length) await section('medium context curve', () => contextSection(model, s, rows, meta));
    else meta['medium context curve'] = { skipped: 'SWITCHYARD_BENCH_CONTEXTS=none' };
  } catch (err) {
    // What was measured is still written, marked as failed; the suite fails.
    const message = failure(current, err);
    meta.failed = message;
    meta.totalSeconds = secs(t0);
    await report('serving', [...rows, ...cluster], meta);
    throw new Error(message, { cause: err });
  } finally {
    try {
      medium?.dispose();
    } catch {
      // Only after a wasm failure, which is being reported.
    }
  }
  meta.totalSeconds = secs(t0);
  await report('serving', [...rows, ...cluster], meta);
}
