// The router side of a sparse MoE block: gate → routing plan → one row batch per expert → combine, and
// the backward through combine weights, experts and gate. Experts are reached only via ExpertTransport.
import * as tf from '@tensorflow/tfjs-core';
import { gateBackward, gumbelNoise, multiplicativeJitter, policyFromSettings, routeTokens, rtsEnabled, rtsUniforms, zLoss, type GatePolicy, type PooledAuxTotals, type RoutingPlan } from '../gating/index.js';
import type { GateSettings } from '../config.js';
import type { ExpertTransport, RowBatch } from './experts.js';
import { isUnserved, OverloadError, type Unserved } from '../overload.js';
import { mm, mmTA, type T2 } from './tensors.js';
import { ComputeTurns } from './pipeline.js';

export interface MoeCallOptions {
  passId: string;
  train: boolean;
  /** Tokens per routing group; 0 = all tokens of the call form one group. */
  groupTokens: number;
  /** Uniform [0,1) source for opt-in training noise. */
  random?: () => number;
  /** Training with Random Token Selection (use_rts): where this call's tokens sit in the stream. */
  rts?: RtsPosition;
  /** Per-expert selection bias (aux-loss-free balancing). */
  selectionBias?: Float32Array;
  /** Client requests whose tokens this call carries (x-request-id), passed on to the experts' holders. */
  requestIds?: string[];
  /** Epoch ms after which nobody waits for this call's answer. */
  deadline?: number;
  /** The micro-batch turns of the pass (pipeline.ts): other lanes compute while this call's rows are away. */
  turns?: ComputeTurns;
  /** The router's own bias [experts] added to every row's logits (GPT-OSS `mlp.router.bias`; no backward). */
  gateBias?: Float32Array;
  /** Router work that needs no expert output (a shared-expert MLP): runs once the rows are on the wire. */
  whileAway?: () => void;
  /**
   * Training noise drawn for this call's tokens in advance (a micro-batch's slice of the whole pass's,
   * so the draws do not depend on how the pass is split): multiplicative jitter [tokens·hidden] and
   * second-choice Gumbel noise [tokens·experts].
   */
  noise?: { jitter?: Float32Array; gumbel?: Float32Array };
}

/**
 * Random Token Selection's position in its counter-based stream: the training seed, the step, and the
 * global index (in the step's whole batch) of the call's first token. The layer is the MoE layer's own.
 */
export interface RtsPosition {
  seed: number;
  step: number;
  firstToken: number;
}

/** Per-call routing statistics (summed over groups). */
export interface MoeStats {
  countsBeforeDrop: Int32Array;
  countsAfterDrop: Int32Array;
  /** Mean over groups. */
  auxLoss: number;
  zLoss: number;
  droppedChoices: number;
  capacity: number;
  plans: RoutingPlan[];
  /** Inference only: tokens with a choice that could not reach its expert (1), and why. */
  degradedTokens?: Uint8Array;
  degradedReasons?: string[];
}

/**
 * Every routing group's plan laid end to end: token-major over the whole call (groups are contiguous
 * token ranges), plus where each kept choice sits in its expert's row batch.
 */
interface Dispatch {
  plans: RoutingPlan[];
  groupStarts: number[];
  /** [tokens·k] chosen expert, combine weight, row in the expert's batch (−1 = dropped). */
  expert: Int32Array;
  weight: Float32Array;
  row: Int32Array;
  /** [E] rows per expert (kept choices, all groups). */
  rowCounts: Int32Array;
}

export interface MoeCache {
  dispatch: Dispatch;
  logits: Float32Array;
  /** Output rows per expert, for the gradient of the combine weights. */
  expertOutputs: Map<number, Float32Array>;
  hGate: T2;
  jitter?: tf.Tensor2D;
  passId: string;
}

function dispatchOf(plans: RoutingPlan[], groupStarts: number[], tokens: number, experts: number, k: number): Dispatch {
  const expert = new Int32Array(tokens * k);
  const weight = new Float32Array(tokens * k);
  const row = new Int32Array(tokens * k).fill(-1);
  const rowCounts = new Int32Array(experts);
  plans.forEach((plan, g) => {
    const base = groupStarts[g] * k;
    expert.set(plan.expert, base);
    weight.set(plan.weight, base);
    // An expert's rows: group by group, each group's slots in order.
    for (let i = 0; i < plan.expert.length; i++) if (plan.slot[i] >= 0) row[base + i] = rowCounts[plan.expert[i]] + plan.slot[i];
    for (let e = 0; e < experts; e++) rowCounts[e] += plan.countsAfterDrop[e];
  });
  return { plans, groupStarts, expert, weight, row, rowCounts };
}

/** One empty batch per expert that has rows, and the batch index of each expert (−1 = none). */
function emptyBatches(layer: number, rowCounts: Int32Array, hidden: number): { batches: RowBatch[]; batchOf: Int32Array } {
  const batches: RowBatch[] = [];
  const batchOf = new Int32Array(rowCounts.length).fill(-1);
  rowCounts.forEach((rowCount, e) => {
    if (rowCount === 0) return;
    batchOf[e] = batches.length;
    batches.push({ layer, expert: e, rowCount, rows: new Float32Array(rowCount * hidden) });
  });
  return { batches, batchOf };
}

export class MoeLayer {
  constructor(
    readonly layer: number,
    readonly hidden: number,
    readonly experts: number,
    readonly k: number,
    readonly gate: GateSettings,
    readonly transport: ExpertTransport,
    /** false: combine with the chosen softmax weights as they are (DeepSeek-MoE norm_topk_prob = false). */
    readonly renormalize = true,
  ) {}

  private route(logits: Float32Array, tokens: number, opt: MoeCallOptions, noisy: boolean): { plans: RoutingPlan[]; groupStarts: number[]; zLoss: number } {
    const E = this.experts;
    const groupSize = opt.groupTokens > 0 ? opt.groupTokens : Math.max(tokens, 1);
    const policy = policyFromSettings(this.gate, this.k, opt.train ? 'train' : 'eval', opt.selectionBias, this.renormalize);
    // Random Token Selection in training only (evaluation and serving keep the first tokens: deterministic);
    // without dropping it cannot change anything.
    const wantsRts = opt.train && rtsEnabled(this.gate) && this.gate.drop_tokens;
    const rts = wantsRts ? opt.rts : undefined;
    if (wantsRts && !rts)
      throw new RangeError(`MoE layer ${this.layer}: use_rts (Random Token Selection, on by default for policy 'switch') needs the step's selection position (options.rts); pass it, or set switchyard_gate.use_rts: false`);
    const plans: RoutingPlan[] = [];
    const groupStarts: number[] = [];
    let zSum = 0;
    for (let start = 0; start < tokens; start += groupSize) {
      const len = Math.min(groupSize, tokens - start);
      const groupLogits = logits.subarray(start * E, (start + len) * E);
      let p: GatePolicy = noisy && this.gate.second_expert_sampling && this.k >= 2
        ? { ...policy, secondChoiceNoise: opt.noise?.gumbel?.subarray(start * E, (start + len) * E) ?? gumbelNoise(len * E, opt.random!) }
        : policy;
      if (rts) p = { ...p, selectionUniform: rtsUniforms({ seed: rts.seed, step: rts.step, layer: this.layer }, rts.firstToken + start, len, E) };
      plans.push(routeTokens(groupLogits, len, E, p));
      groupStarts.push(start);
      zSum += zLoss(groupLogits, len, E);
    }
    return { plans, groupStarts, zLoss: plans.length ? zSum / plans.length : 0 };
  }

  async forward(h: T2, gateW: T2, opt: MoeCallOptions): Promise<{ y: T2; stats: MoeStats; cache?: MoeCache }> {
    const tokens = h.shape[0];
    const D = this.hidden;
    const E = this.experts;
    const k = this.k;
    const noisy = opt.train && opt.random !== undefined;
    let jitter: tf.Tensor2D | undefined;
    let hGate = h;
    if (noisy && this.gate.jitter_eps > 0) {
      jitter = tf.tensor2d(opt.noise?.jitter ?? multiplicativeJitter(new Float32Array(tokens * D), this.gate.jitter_eps, opt.random!), [tokens, D]);
      hGate = tf.mul(h, jitter);
    }
    // Until the cache takes them, the gate input this call made is freed on any failure (experts
    // unreachable, overload, deadline).
    try {
      const logitsT = mm(hGate, gateW);
      const logits = opt.gateBias ? Float32Array.from(logitsT.dataSync() as Float32Array) : logitsT.dataSync() as Float32Array;
      logitsT.dispose();
      if (opt.gateBias) {
        if (opt.train) throw new Error(`MoE layer ${this.layer}: a router bias has no backward (GPT-OSS is served, not trained)`);
        const bias = opt.gateBias;
        for (let o = 0; o < logits.length; o += E) for (let e = 0; e < E; e++) logits[o + e] += bias[e];
      }
      const routed = this.route(logits, tokens, opt, noisy);
      const dispatch = dispatchOf(routed.plans, routed.groupStarts, tokens, E, k);

      const hRows = h.dataSync() as Float32Array;
      const { batches, batchOf } = emptyBatches(this.layer, dispatch.rowCounts, D);
      for (let i = 0; i < tokens * k; i++) {
        const row = dispatch.row[i];
        if (row < 0) continue;
        const t = (i / k) | 0;
        batches[batchOf[dispatch.expert[i]]].rows.set(hRows.subarray(t * D, t * D + D), row * D);
      }
      const context = { requestIds: opt.requestIds, deadline: opt.deadline };
      const turns = opt.turns ?? new ComputeTurns(true);
      const outputs: Array<Float32Array | Unserved> = await turns.away(!opt.train && this.transport.serve
        ? this.transport.serve(opt.passId, batches, context)
        : this.transport.forward(opt.passId, batches, opt.train, context), opt.whileAway, this.transport.remote === true);
      const combined = new Float32Array(tokens * D);
      const lost = outputs.some(isUnserved) ? await this.overflow(outputs, batches, logits, dispatch, hRows, tokens, opt) : undefined;
      for (let i = 0; i < tokens * k; i++) {
        const row = dispatch.row[i];
        if (row < 0) continue;
        const w = dispatch.weight[i];
        const served = outputs[batchOf[dispatch.expert[i]]];
        let out: Float32Array;
        let o = row * D;
        if (isUnserved(served)) {
          // Rerouted to another expert, or dropped to the residual path (contributes nothing).
          const moved = lost?.moved.get(i);
          if (!moved) continue;
          out = moved.values;
          o = moved.row * D;
        } else out = served;
        const c = ((i / k) | 0) * D;
        for (let d = 0; d < D; d++) combined[c + d] += w * out[o + d];
      }
      const y = tf.tensor2d(combined, [tokens, D]);

      const countsBeforeDrop = new Int32Array(E);
      let auxSum = 0;
      let capacity = 0;
      for (const plan of routed.plans) {
        for (let e = 0; e < E; e++) countsBeforeDrop[e] += plan.countsBeforeDrop[e];
        auxSum += plan.auxLoss;
        capacity = Math.max(capacity, plan.capacity);
      }
      const kept = dispatch.rowCounts.reduce((s, n) => s + n, 0);
      const stats: MoeStats = {
        countsBeforeDrop, countsAfterDrop: dispatch.rowCounts, droppedChoices: tokens * k - kept, capacity,
        plans: routed.plans, auxLoss: routed.plans.length ? auxSum / routed.plans.length : 0, zLoss: routed.zLoss,
        ...(lost ? { degradedTokens: lost.tokens, degradedReasons: lost.reasons } : {}),
      };
      if (!opt.train) {
        if (jitter) tf.dispose([jitter, hGate]);
        return { y, stats };
      }
      const expertOutputs = new Map<number, Float32Array>();
      batches.forEach((b, j) => expertOutputs.set(b.expert, outputs[j] as Float32Array)); // training never leaves rows unserved
      const cache: MoeCache = { dispatch, logits, expertOutputs, hGate: hGate === h ? h.clone() : hGate, jitter, passId: opt.passId };
      return { y, stats, cache };
    } catch (err) {
      if (jitter) tf.dispose([jitter, hGate]);
      throw err;
    }
  }

  /**
   * Inference rows whose expert could not take them, per the transport's overflow policy: `reject`
   * fails the call with 503; `reroute` sends them to the token's best-scoring reachable expert it did not
   * choose already (one more round trip); otherwise they drop to the residual path. Returns where moved
   * rows' outputs are and which tokens were affected.
   */
  private async overflow(
    outputs: Array<Float32Array | Unserved>, batches: RowBatch[], logits: Float32Array, dispatch: Dispatch, hRows: Float32Array, tokens: number, opt: MoeCallOptions,
  ): Promise<{ moved: Map<number, { values: Float32Array; row: number }>; tokens: Uint8Array; reasons: string[] }> {
    const E = this.experts;
    const k = this.k;
    const D = this.hidden;
    const policy = this.transport.overflow ?? 'drop';
    const reasons = [...new Set(outputs.filter(isUnserved).map((u) => u.unserved))];
    if (policy === 'reject') throw new OverloadError(`experts out of reach: ${reasons.join('; ')}`, 'unavailable');
    const lostExperts = new Set(batches.filter((_, j) => isUnserved(outputs[j])).map((b) => b.expert));
    const affected = new Uint8Array(tokens);
    const moved = new Map<number, { values: Float32Array; row: number }>();
    const target = new Map<number, { expert: number; row: number }>();
    const rowsPerExpert = new Int32Array(E);
    for (let i = 0; i < tokens * k; i++) {
      if (dispatch.row[i] < 0 || !lostExperts.has(dispatch.expert[i])) continue;
      const t = (i / k) | 0;
      affected[t] = 1;
      if (policy !== 'reroute') continue;
      let best = -1;
      for (let e = 0; e < E; e++) {
        if (lostExperts.has(e)) continue;
        let taken = false;
        for (let c = 0; c < k; c++) {
          // Chosen already, or the reroute target of another of this token's lost choices.
          if (dispatch.expert[t * k + c] === e || target.get(t * k + c)?.expert === e) taken = true;
        }
        if (!taken && (best < 0 || logits[t * E + e] > logits[t * E + best])) best = e;
      }
      if (best >= 0) target.set(i, { expert: best, row: rowsPerExpert[best]++ });
    }
    if (target.size > 0) {
      const { batches: extra, batchOf } = emptyBatches(this.layer, rowsPerExpert, D);
      for (const [i, { expert, row }] of target) {
        const t = (i / k) | 0;
        extra[batchOf[expert]].rows.set(hRows.subarray(t * D, t * D + D), row * D);
      }
      const second = await (opt.turns ?? new ComputeTurns(true)).away(this.transport.serve!(`${opt.passId}/reroute`, extra, { requestIds: opt.requestIds, deadline: opt.deadline }), undefined, this.transport.remote === true);
      for (const [i, { expert, row }] of target) {
        const out = second[batchOf[expert]];
        if (!isUnserved(out)) moved.set(i, { values: out, row });
      }
      reasons.push(`${moved.size} choice(s) rerouted to the next-best expert`);
    }
    return { moved, tokens: affected, reasons };
  }

  /**
   * dy: gradient of the block output. Returns the gradients of the block input and of the gate weight;
   * expert weight gradients accumulate at the experts' holder. Loss terms:
   * auxCoef·mean_groups(aux) + zCoef·mean_groups(z); with `pooledAux` (aux_loss_scope 'batch') the aux term
   * is auxCoef·pooledAuxLoss(pooledAux), the one loss of every layer and group pooled. `pass.groups`: the
   * routing groups of the layer's whole pass when this call is one micro-batch of it (the mean is over
   * all of them). Frees the cache's tensors, also when it fails.
   */
  async backward(
    dy: T2, cache: MoeCache, gateWT: T2, auxCoef: number, zCoef: number, pooledAux?: PooledAuxTotals, pass: { turns?: ComputeTurns; groups?: number } = {},
  ): Promise<{ dh: T2; dGate: T2 }> {
    try {
      const D = this.hidden;
      const E = this.experts;
      const k = this.k;
      const tokens = dy.shape[0];
      const { dispatch } = cache;
      const dyRows = dy.dataSync() as Float32Array;
      const { batches: dBatches, batchOf } = emptyBatches(this.layer, dispatch.rowCounts, D);
      // d(combine weight) = dy · expert output; d(expert output) = weight · dy.
      const dWeight = new Float32Array(tokens * k);
      for (let i = 0; i < tokens * k; i++) {
        const row = dispatch.row[i];
        if (row < 0) continue;
        const e = dispatch.expert[i];
        const w = dispatch.weight[i];
        const out = cache.expertOutputs.get(e)!;
        const dRows = dBatches[batchOf[e]].rows;
        const o = row * D;
        const c = ((i / k) | 0) * D;
        let dot = 0;
        for (let d = 0; d < D; d++) {
          dRows[o + d] = w * dyRows[c + d];
          dot += dyRows[c + d] * out[o + d];
        }
        dWeight[i] = dot;
      }
      const dxRows = await (pass.turns ?? new ComputeTurns(true)).away(this.transport.backward(cache.passId, dBatches), undefined, this.transport.remote === true);
      const dh = new Float32Array(tokens * D);
      for (let i = 0; i < tokens * k; i++) {
        const row = dispatch.row[i];
        if (row < 0) continue;
        const dx = dxRows[batchOf[dispatch.expert[i]]];
        const o = row * D;
        const c = ((i / k) | 0) * D;
        for (let d = 0; d < D; d++) dh[c + d] += dx[o + d];
      }
      const groups = pass.groups ?? dispatch.plans.length;
      const dLogits = new Float32Array(tokens * E);
      dispatch.plans.forEach((plan, g) => {
        const start = dispatch.groupStarts[g];
        const end = start + plan.tokens;
        const grad = gateBackward(plan, cache.logits.subarray(start * E, end * E), dWeight.subarray(start * k, end * k), pooledAux ? auxCoef : auxCoef / groups, zCoef / groups, pooledAux);
        dLogits.set(grad, start * E);
      });
      const result = tf.tidy(() => {
        const dL = tf.tensor2d(dLogits, [tokens, E]);
        const dGate = mmTA(cache.hGate, dL);
        let dhGate: tf.Tensor = mm(dL, gateWT);
        if (cache.jitter) dhGate = tf.mul(dhGate, cache.jitter);
        return { dh: tf.add(tf.tensor2d(dh, [tokens, D]), dhGate) as T2, dGate };
      });
      return result;
    } finally {
      // The cache is consumed whether the backward completes or its experts fail.
      tf.dispose([cache.hGate, cache.jitter ?? []]);
    }
  }
}
