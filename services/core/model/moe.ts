// The router side of a sparse MoE block: gate → routing plan → one row batch per expert → combine, and
// the backward through combine weights, experts and gate. Experts are reached only via ExpertTransport.
import * as tf from '@tensorflow/tfjs-core';
import { gateBackward, gumbelNoise, multiplicativeJitter, policyFromSettings, routeTokens, zLoss, type GatePolicy, type RoutingPlan } from '../gating/index.js';
import type { GateSettings } from '../config.js';
import type { ExpertTransport, RowBatch } from './experts.js';
import { mm, mmTA, type T2 } from './tensors.js';

export interface MoeCallOptions {
  passId: string;
  train: boolean;
  /** Tokens per routing group; 0 = all tokens of the call form one group. */
  groupTokens: number;
  /** Uniform [0,1) source for opt-in training noise. */
  random?: () => number;
  /** Per-expert selection bias (aux-loss-free balancing). */
  selectionBias?: Float32Array;
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
}

export interface MoeCache {
  plans: RoutingPlan[];
  groupStarts: number[];
  groupSize: number;
  logits: Float32Array;
  /** Row of each choice in its expert's batch (−1 = dropped), tokens·k entries. */
  choiceRow: Int32Array;
  expertOutputs: Map<number, Float32Array>;
  rowCounts: Int32Array;
  hGate: T2;
  jitter?: tf.Tensor2D;
  passId: string;
}

export class MoeLayer {
  constructor(
    readonly layer: number,
    readonly hidden: number,
    readonly experts: number,
    readonly k: number,
    readonly gate: GateSettings,
    readonly transport: ExpertTransport,
  ) {}

  async forward(h: T2, gateW: T2, opt: MoeCallOptions): Promise<{ y: T2; stats: MoeStats; cache?: MoeCache }> {
    const tokens = h.shape[0];
    const D = this.hidden;
    const E = this.experts;
    const k = this.k;
    const noisy = opt.train && opt.random !== undefined;
    let jitter: tf.Tensor2D | undefined;
    let hGate = h;
    if (noisy && this.gate.jitter_eps > 0) {
      const factors = multiplicativeJitter(new Float32Array(tokens * D), this.gate.jitter_eps, opt.random!);
      jitter = tf.tensor2d(factors, [tokens, D]);
      hGate = tf.mul(h, jitter);
    }
    const logitsT = mm(hGate, gateW);
    const logits = logitsT.dataSync() as Float32Array;
    logitsT.dispose();
    const hRows = h.dataSync() as Float32Array;

    const groupSize = opt.groupTokens > 0 ? opt.groupTokens : tokens;
    const groupStarts: number[] = [];
    const plans: RoutingPlan[] = [];
    const policy = policyFromSettings(this.gate, k, opt.train ? 'train' : 'eval', opt.selectionBias);
    let auxSum = 0;
    let zSum = 0;
    for (let start = 0; start < tokens; start += groupSize) {
      const len = Math.min(groupSize, tokens - start);
      const groupLogits = logits.subarray(start * E, (start + len) * E);
      const p: GatePolicy =
        noisy && this.gate.second_expert_sampling && k >= 2
          ? { ...policy, secondChoiceNoise: gumbelNoise(len * E, opt.random!) }
          : policy;
      const plan = routeTokens(groupLogits, len, E, p);
      plans.push(plan);
      groupStarts.push(start);
      auxSum += plan.auxLoss;
      zSum += zLoss(groupLogits, len, E);
    }

    // Rows of expert e: group by group, each group's slots in order.
    const rowCounts = new Int32Array(E);
    const choiceRow = new Int32Array(tokens * k).fill(-1);
    const countsBeforeDrop = new Int32Array(E);
    const countsAfterDrop = new Int32Array(E);
    let droppedChoices = 0;
    let capacity = 0;
    for (let g = 0; g < plans.length; g++) {
      const plan = plans[g];
      const base = groupStarts[g] * k;
      for (let i = 0; i < plan.expert.length; i++) {
        if (plan.slot[i] < 0) {
          droppedChoices++;
          continue;
        }
        choiceRow[base + i] = rowCounts[plan.expert[i]] + plan.slot[i];
      }
      for (let e = 0; e < E; e++) {
        rowCounts[e] += plan.countsAfterDrop[e];
        countsBeforeDrop[e] += plan.countsBeforeDrop[e];
        countsAfterDrop[e] += plan.countsAfterDrop[e];
      }
      capacity = Math.max(capacity, plan.capacity);
    }
    const batches: RowBatch[] = [];
    const batchOf = new Int32Array(E).fill(-1);
    for (let e = 0; e < E; e++) {
      if (rowCounts[e] === 0) continue;
      batchOf[e] = batches.length;
      batches.push({ layer: this.layer, expert: e, rowCount: rowCounts[e], rows: new Float32Array(rowCounts[e] * D) });
    }
    for (let i = 0; i < tokens * k; i++) {
      const row = choiceRow[i];
      if (row < 0) continue;
      const t = Math.floor(i / k);
      const g = Math.floor(t / groupSize);
      const e = plans[g].expert[i - groupStarts[g] * k];
      batches[batchOf[e]].rows.set(hRows.subarray(t * D, t * D + D), row * D);
    }

    const outputs = await this.transport.forward(opt.passId, batches, opt.train);
    const combined = new Float32Array(tokens * D);
    for (let i = 0; i < tokens * k; i++) {
      const row = choiceRow[i];
      if (row < 0) continue;
      const t = Math.floor(i / k);
      const g = Math.floor(t / groupSize);
      const w = plans[g].weight[i - groupStarts[g] * k];
      const out = outputs[batchOf[plans[g].expert[i - groupStarts[g] * k]]];
      const o = row * D;
      const c = t * D;
      for (let d = 0; d < D; d++) combined[c + d] += w * out[o + d];
    }
    const y = tf.tensor2d(combined, [tokens, D]);
    const stats: MoeStats = {
      countsBeforeDrop, countsAfterDrop, droppedChoices, capacity, plans,
      auxLoss: auxSum / plans.length, zLoss: zSum / plans.length,
    };
    if (!opt.train) {
      if (jitter) { jitter.dispose(); hGate.dispose(); }
      return { y, stats };
    }
    const expertOutputs = new Map<number, Float32Array>();
    batches.forEach((b, j) => expertOutputs.set(b.expert, outputs[j]));
    const cache: MoeCache = {
      plans, groupStarts, groupSize, logits, choiceRow, expertOutputs, rowCounts,
      hGate: hGate === h ? h.clone() : hGate, jitter, passId: opt.passId,
    };
    return { y, stats, cache };
  }

  /**
   * dy: gradient of the block output. Accumulates nothing itself: returns the gate weight gradient and
   * the gradient of the block input. Loss terms: auxCoef·mean_groups(aux) + zCoef·mean_groups(z).
   */
  async backward(dy: T2, cache: MoeCache, gateWT: T2, auxCoef: number, zCoef: number): Promise<{ dh: T2; dGate: T2 }> {
    const D = this.hidden;
    const E = this.experts;
    const k = this.k;
    const tokens = dy.shape[0];
    const dyRows = dy.dataSync() as Float32Array;
    const groupSize = cache.groupSize;
    const dBatches: RowBatch[] = [];
    const batchOf = new Int32Array(E).fill(-1);
    for (let e = 0; e < E; e++) {
      if (cache.rowCounts[e] === 0) continue;
      batchOf[e] = dBatches.length;
      dBatches.push({ layer: this.layer, expert: e, rowCount: cache.rowCounts[e], rows: new Float32Array(cache.rowCounts[e] * D) });
    }
    const dWeights = cache.plans.map((p) => new Float32Array(p.weight.length));
    for (let i = 0; i < tokens * k; i++) {
      const row = cache.choiceRow[i];
      if (row < 0) continue;
      const t = Math.floor(i / k);
      const g = Math.floor(t / groupSize);
      const local = i - cache.groupStarts[g] * k;
      const e = cache.plans[g].expert[local];
      const w = cache.plans[g].weight[local];
      const out = cache.expertOutputs.get(e)!;
      const dRows = dBatches[batchOf[e]].rows;
      const o = row * D;
      const c = t * D;
      let dot = 0;
      for (let d = 0; d < D; d++) {
        dRows[o + d] = w * dyRows[c + d];
        dot += dyRows[c + d] * out[o + d];
      }
      dWeights[g][local] = dot;
    }
    const dxRows = await this.transport.backward(cache.passId, dBatches);
    const dh = new Float32Array(tokens * D);
    for (let i = 0; i < tokens * k; i++) {
      const row = cache.choiceRow[i];
      if (row < 0) continue;
      const t = Math.floor(i / k);
      const g = Math.floor(t / groupSize);
      const e = cache.plans[g].expert[i - cache.groupStarts[g] * k];
      const dx = dxRows[batchOf[e]];
      const o = row * D;
      const c = t * D;
      for (let d = 0; d < D; d++) dh[c + d] += dx[o + d];
    }
    const groups = cache.plans.length;
    const dLogits = new Float32Array(tokens * E);
    cache.plans.forEach((plan, g) => {
      const start = cache.groupStarts[g];
      const groupLogits = cache.logits.subarray(start * E, (start + plan.tokens) * E);
      dLogits.set(gateBackward(plan, groupLogits, dWeights[g], auxCoef / groups, zCoef / groups), start * E);
    });
    const result = tf.tidy(() => {
      const dL = tf.tensor2d(dLogits, [tokens, E]);
      const dGate = mmTA(cache.hGate, dL);
      let dhGate: tf.Tensor = mm(dL, gateWT);
      if (cache.jitter) dhGate = tf.mul(dhGate, cache.jitter);
      return { dh: tf.add(tf.tensor2d(dh, [tokens, D]), dhGate) as T2, dGate };
    });
    cache.hGate.dispose();
    cache.jitter?.dispose();
    return result;
  }
}
