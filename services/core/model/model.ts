// The decoder of every supported family: embedding → per layer (RMSNorm → attention → residual → RMSNorm →
// feed-forward → residual) → RMSNorm → LM head, with forward and hand-written backward (Mixtral). The
// feed-forward is the sparse MoE block, plus for DeepSeek-MoE the shared experts, or a dense MLP in the
// layers its config keeps dense (family.ts says which). Routed experts are reached through an
// ExpertTransport, so the same code runs in one process or against expert shards; shared experts and
// dense MLPs are router-side weights (docs/families.md).
import * as tf from '@tensorflow/tfjs-core';
import { headDim, type ModelConfig } from '../config.js';
import { Rng } from '../data/random.js';
import { gumbelNoise, isDropless, multiplicativeJitter, pooledAuxLoss, pooledAuxTotals, updateBalanceBias, type PooledAuxTotals } from '../gating/index.js';
import { attentionBackward, attentionForward, type AttentionCache, type AttentionWeights, type KvCache } from './attention.js';
import { QkvTransform, type QkvParams } from './qkv.js';
import { gptOssExpertsToHf } from './gpt-oss-experts.js';
import type { StoredTensor } from '../checkpoint/safetensors.js';
import type { KvStore } from './kv-store.js';
import { StepAttention, type PagedSequence } from './paged-attention.js';
import { expertBackward, expertForward, type ExpertBiases, type ExpertCache, type ExpertWeights } from './expert.js';
import { ExpertSet, InProcessTransport, type ExpertTransport } from './experts.js';
import { assertTrainable, familyOf, type ModelFamily } from './family.js';
import { denseFromHf, denseNames, denseToHf, expertToHf, type HostTensor } from './hf.js';
import { MoeLayer, type MoeCache, type MoeCallOptions, type MoeStats, type RtsPosition } from './moe.js';
import { ParameterTable } from './parameters.js';
import { rmsNormBackward, rmsNormForward, rmsNormRows, type RmsNormCache } from './rmsnorm.js';
import { Rope } from './rope.js';
import { addInto, disposeAll, mm, mmTA, type T2 } from './tensors.js';
import { ComputeTurns, lanesFor, splitLanes } from './pipeline.js';

export interface PassOptions {
  passId: string;
  train: boolean;
  /** Tokens per routing group; 0 = the whole call is one group. */
  groupTokens?: number;
  /** Source of opt-in training noise (jitter, second-expert sampling). */
  random?: () => number;
  /** Training with Random Token Selection (switch, use_rts): seed, step and the first token's global index. */
  rts?: RtsPosition;
  /** Client requests served by this pass (x-request-id), for the experts' holders' logs. */
  requestIds?: string[];
  /** Epoch ms after which nobody waits for this pass (inference). */
  deadline?: number;
}

export interface LossResult {
  /** Total objective: cross-entropy + auxiliary terms. */
  loss: number;
  /** Mean cross-entropy in nats per token. */
  crossEntropy: number;
  auxLoss: number;
  zLoss: number;
  layerStats: MoeStats[];
}

/** A sequence's part of a serving step (MixtralModel.step). */
export interface StepSequence {
  /** New ids: a decode token or a prefill chunk. */
  ids: Int32Array;
  /** Tokens already in its KV blocks. */
  past: number;
  /** Its block table: blocks[i] holds positions [i·B, (i+1)·B), covering past + ids.length. */
  blocks: ArrayLike<number>;
  /** Whether the step returns the logits of its last new id (the prompt's end, or a decode token). */
  logits: boolean;
  /** Also every new id's logits (prompt log-probabilities): StepOutput.rowLogits. */
  allLogits?: boolean;
}

/**
 * Where a step's time went (ms, summed over layers): waiting for the fused q|k|v projection (the dense
 * work queued before it), the host attention, and the feed-forward block (gate, experts, combine).
 */
export interface StepProfile {
  qkvMs: number;
  attentionMs: number;
  feedForwardMs: number;
}

export interface StepOutput {
  logits?: Float32Array;
  /** With allLogits: the logits of each new id, row after row ([ids.length, vocab]). */
  rowLogits?: Float32Array;
  /** Why some of its rows could not reach their experts (overflow policy drop/reroute), if any did. */
  degraded?: string[];
}

/** What a training forward keeps of a router-side MLP (dense layer or shared experts), and of its sigmoid gate. */
interface RouterMlpCache { expert: ExpertCache; gate?: { sigmoid: T2; ungated: T2 } }

interface LayerCache { n1: RmsNormCache; attn: AttentionCache; n2: RmsNormCache; moe?: MoeCache; mlp?: RouterMlpCache }

/** What a forward (or one micro-batch of it) leaves: logits, final hidden rows, per-layer caches when training. */
interface ForwardOutput { logits: T2; hidden: T2; caches?: LayerCache[]; finalNorm?: RmsNormCache; stats: MoeStats[]; kv: KvCache[] }

/** A training forward split into micro-batches: each lane's output and its sequence range. */
interface LaneForwards { lanes: ForwardOutput[]; ranges: Array<[number, number]> }

/** Training noise of one MoE layer for a whole pass (drawn in the single-pass order), sliced per lane. */
interface LayerNoise { jitter?: Float32Array; gumbel?: Float32Array }

const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));

/** One MoE layer's statistics over several micro-batches of a pass, as one call over all of them would give. */
function mergeStats(parts: MoeStats[]): MoeStats {
  if (parts.length === 1) return parts[0];
  const E = parts[0].countsBeforeDrop.length;
  const countsBeforeDrop = new Int32Array(E);
  const countsAfterDrop = new Int32Array(E);
  let groups = 0;
  let aux = 0;
  let z = 0;
  let droppedChoices = 0;
  let capacity = 0;
  for (const p of parts) {
    for (let e = 0; e < E; e++) {
      countsBeforeDrop[e] += p.countsBeforeDrop[e];
      countsAfterDrop[e] += p.countsAfterDrop[e];
    }
    // Aux and z are means over routing groups; micro-batches hold whole groups.
    aux += p.auxLoss * p.plans.length;
    z += p.zLoss * p.plans.length;
    groups += p.plans.length;
    droppedChoices += p.droppedChoices;
    capacity = Math.max(capacity, p.capacity);
  }
  const merged: MoeStats = {
    countsBeforeDrop, countsAfterDrop, droppedChoices, capacity, plans: parts.flatMap((p) => p.plans),
    auxLoss: groups ? aux / groups : 0, zLoss: groups ? z / groups : 0,
  };
  if (parts.some((p) => p.degradedTokens)) {
    const tokensOf = (p: MoeStats) => p.plans.reduce((n, plan) => n + plan.tokens, 0);
    const flags = new Uint8Array(parts.reduce((n, p) => n + tokensOf(p), 0));
    let at = 0;
    for (const p of parts) {
      if (p.degradedTokens) flags.set(p.degradedTokens, at);
      at += tokensOf(p);
    }
    merged.degradedTokens = flags;
    merged.degradedReasons = [...new Set(parts.flatMap((p) => p.degradedReasons ?? []))];
  }
  return merged;
}

function normalInit(rng: Rng, count: number, std: number): Float32Array {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = rng.normal() * std;
  return out;
}

/** See MixtralModel.minExpertRowsPerLane. */
export const DEFAULT_MIN_EXPERT_ROWS_PER_LANE = 4;

export class MixtralModel {
  readonly dense = new ParameterTable();
  readonly rope: Rope;
  readonly family: ModelFamily;
  /** The sparse MoE block per layer; undefined for layers the family keeps dense. */
  readonly moe: Array<MoeLayer | undefined>;
  readonly headDim: number;
  /** The family's step between the q|k|v projection and RoPE (inactive for Llama attention). */
  readonly qkvTransform: QkvTransform;
  /** Aux-loss-free balancing bias per layer, when enabled. */
  readonly balanceBias: Float32Array[] | undefined;
  private transposed = new Map<string, T2>();
  private transposedVersion = -1;
  /** Sees every inference MoE block's routing (the router's metrics and dashboard). */
  onRouting?: (layer: number, stats: MoeStats) => void;
  private embedTable?: Float32Array;
  private embedVersion = -1;
  private readonly hostWeights = new Map<string, Float32Array>();
  private hostWeightsVersion = -1;
  /**
   * Micro-batches per pass (ping-pong, pipeline.ts): serving steps, inference forwards and training
   * passes split their sequences into this many lanes, so the router computes one lane's attention and
   * gate while another lane's rows are with the experts. 1 = one lane. Pays only with remote experts.
   */
  microBatches = 1;
  /**
   * Fewest rows a lane should bring each expert on average for a split to pay. An expert's matMuls read
   * all its weights whatever the rows; with a row or two per expert that read, not the arithmetic, is the
   * shards' whole cost, so two lanes cost them nearly twice one lane's time, more than the overlap hides
   * (measured on `medium`, 2 shards: 8 concurrent decodes 0.90× split, 32 concurrent 1.20×). 0 = always
   * split.
   */
  minExpertRowsPerLane = DEFAULT_MIN_EXPERT_ROWS_PER_LANE;

  constructor(readonly config: ModelConfig, readonly transport: ExpertTransport, readonly localExperts?: ExpertSet) {
    this.headDim = headDim(config);
    this.rope = new Rope(this.headDim, config.rope_theta, config.rope_scaling, config.max_position_embeddings);
    const f = (this.family = familyOf(config));
    this.qkvTransform = new QkvTransform(f.attention, { heads: config.num_attention_heads, kvHeads: config.num_key_value_heads, headDim: this.headDim }, config.rms_norm_eps);
    this.moe = Array.from({ length: config.num_hidden_layers }, (_, l) => f.isMoe(l)
      ? new MoeLayer(l, config.hidden_size, f.experts, f.k, config.switchyard_gate, transport, f.renormalize)
      : undefined);
    // Indexed by layer; entries of dense layers stay unused.
    this.balanceBias = config.switchyard_gate.balance_bias_rate > 0
      ? Array.from({ length: config.num_hidden_layers }, () => new Float32Array(f.experts))
      : undefined;
  }

  /** A freshly initialised model of the config's family with all experts in-process (seeded, deterministic). */
  static initialize(config: ModelConfig, seed: number): MixtralModel {
    const rng = new Rng(seed);
    const family = familyOf(config);
    const D = config.hidden_size;
    const H = family.expertIntermediate;
    const V = config.vocab_size;
    const hd = headDim(config);
    const std = config.initializer_range;
    // Residual-branch outputs scaled down with depth (GPT-2) so the stream does not grow with layers.
    const outStd = std / Math.sqrt(2 * config.num_hidden_layers);
    const experts = new ExpertSet(D, H, family.expertActivation);
    const model = new MixtralModel(config, new InProcessTransport(experts), experts);
    const d = model.dense;
    const ones = () => tf.ones([D]);
    d.define(denseNames.embed, tf.tensor2d(normalInit(rng, V * D, std), [V, D]));
    const qkvWidth = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd;
    for (let l = 0; l < config.num_hidden_layers; l++) {
      d.define(denseNames.attnNorm(l), ones());
      d.define(denseNames.wqkv(l), tf.tensor2d(normalInit(rng, D * qkvWidth, std), [D, qkvWidth]));
      d.define(denseNames.wo(l), tf.tensor2d(normalInit(rng, config.num_attention_heads * hd * D, outStd), [config.num_attention_heads * hd, D]));
      const a = family.attention;
      if (a.qkvBias) d.define(denseNames.bqkv(l), tf.tensor1d(normalInit(rng, qkvWidth, std)));
      if (a.oBias) d.define(denseNames.bo(l), tf.zeros([D]));
      if (a.qkNorm !== 'none') {
        const perHead = a.qkNorm === 'head';
        d.define(denseNames.qNorm(l), tf.ones([perHead ? hd : config.num_attention_heads * hd]));
        d.define(denseNames.kNorm(l), tf.ones([perHead ? hd : config.num_key_value_heads * hd]));
      }
      if (family.sharedExpertGate && family.isMoe(l)) d.define(denseNames.sharedGate(l), tf.tensor2d(normalInit(rng, D, std), [D, 1]));
      if (a.sinks) d.define(denseNames.sinks(l), tf.tensor1d(normalInit(rng, config.num_attention_heads, 1)));
      if (family.gateBias && family.isMoe(l)) d.define(denseNames.gateBias(l), tf.tensor1d(normalInit(rng, family.experts, std)));
      d.define(denseNames.moeNorm(l), ones());
      const swiglu = (width: number): ExpertWeights => ({
        w1t: tf.tensor2d(normalInit(rng, D * width, std), [D, width]),
        w3t: tf.tensor2d(normalInit(rng, D * width, std), [D, width]),
        w2t: tf.tensor2d(normalInit(rng, width * D, outStd), [width, D]),
      });
      if (family.isMoe(l)) {
        d.define(denseNames.gate(l), tf.tensor2d(normalInit(rng, D * family.experts, std), [D, family.experts]));
        // GPT-OSS's experts carry biases on all three projections.
        const biases = (): ExpertBiases => (family.expertActivation.kind === 'silu' ? {} : {
          b1: tf.tensor1d(normalInit(rng, H, std)), b3: tf.tensor1d(normalInit(rng, H, std)), b2: tf.tensor1d(normalInit(rng, D, std)),
        });
        for (let e = 0; e < family.experts; e++) experts.add(l, e, { ...swiglu(H), ...biases() });
      }
      const mlpWidth = family.routerMlpWidth(l);
      if (mlpWidth > 0) for (const [part, w] of Object.entries(swiglu(mlpWidth))) d.define(denseNames.mlp(l, part as keyof ExpertWeights), w);
    }
    d.define(denseNames.norm, ones());
    if (!config.tie_word_embeddings) d.define(denseNames.lmHead, tf.tensor2d(normalInit(rng, D * V, std), [D, V]));
    return model;
  }

  /** A model from Hugging Face tensors with every expert in-process. */
  static fromHf(config: ModelConfig, tensors: ReadonlyMap<string, StoredTensor>): MixtralModel {
    const family = familyOf(config);
    const experts = new ExpertSet(config.hidden_size, family.expertIntermediate, family.expertActivation);
    const model = new MixtralModel(config, new InProcessTransport(experts), experts);
    model.loadDense(tensors);
    for (const l of family.moeLayers)
      for (let e = 0; e < family.experts; e++) experts.addFromHf(tensors, l, e, family);
    return model;
  }

  /** Loads the dense (router-held) parameters from HF tensors (floats: only expert tensors may be MXFP4 bytes). */
  loadDense(tensors: ReadonlyMap<string, StoredTensor>): void {
    for (const [name, t] of denseFromHf(this.config, tensors as Map<string, HostTensor>)) this.dense.define(name, tf.tensor(t.values, t.shape));
    if (this.balanceBias)
      for (const l of this.family.moeLayers) {
        const saved = tensors.get(this.family.names.balanceBias(l)) as HostTensor | undefined;
        if (saved) this.balanceBias[l].set(saved.values);
      }
  }

  /** Every tensor in Hugging Face names and layout (dense + in-process experts). */
  toHf(): Map<string, HostTensor> {
    const host = (t: tf.Tensor): HostTensor => ({ shape: [...t.shape], values: t.dataSync() as Float32Array });
    const dense = new Map<string, HostTensor>();
    for (const name of this.dense.names()) dense.set(name, host(this.dense.get(name)));
    const out = denseToHf(this.config, dense);
    const local = this.localExperts;
    if (local && this.family.fusedExperts) {
      // GPT-OSS stores a layer's experts in one tensor each (unquantized when Switchyard writes them).
      for (const l of this.family.moeLayers) {
        const experts = Array.from({ length: this.family.experts }, (_, e) => {
          const w = local.weights(l, e);
          return { w1t: host(w.w1t), w3t: host(w.w3t), w2t: host(w.w2t), b1: host(w.b1!), b3: host(w.b3!), b2: host(w.b2!) };
        });
        gptOssExpertsToHf(out, l, experts);
      }
    } else if (local)
      for (const { layer, expert } of local.keys()) {
        const w = local.weights(layer, expert);
        expertToHf(this.family.names, out, layer, expert, { w1t: host(w.w1t), w3t: host(w.w3t), w2t: host(w.w2t) });
      }
    if (this.balanceBias)
      for (const l of this.family.moeLayers) {
        const bias = this.balanceBias[l];
        out.set(this.family.names.balanceBias(l), { shape: [bias.length], values: bias.slice() });
      }
    return out;
  }

  /**
   * Layer l's feed-forward block: the routed experts (MoE layers) plus the router-side MLP (DeepSeek's
   * shared experts, or the dense MLP of a dense layer), summed. The router-side MLP is computed once the
   * routed rows are on the wire, while they are away.
   */
  async feedForward(l: number, h: T2, call: MoeCallOptions): Promise<{ y: T2; stats?: MoeStats; cache?: MoeCache; mlpCache?: RouterMlpCache }> {
    const moe = this.moe[l];
    let mlp: T2 | undefined;
    let mlpCache: RouterMlpCache | undefined;
    const computeMlp = this.family.routerMlpWidth(l) === 0 ? undefined : () => {
      const weight = (part: keyof ExpertWeights) => this.dense.get<tf.Rank.R2>(denseNames.mlp(l, part));
      // The same SwiGLU as a routed expert, with router-held weights.
      const out = expertForward(h, { w1t: weight('w1t'), w3t: weight('w3t'), w2t: weight('w2t') }, call.train);
      mlp = out.y;
      if (out.cache) mlpCache = { expert: out.cache };
      if (moe && this.family.sharedExpertGate) {
        // Qwen2-MoE: the shared expert's output scaled per row by sigmoid(shared_expert_gate(x)).
        const ungated = mlp;
        const sigmoid = tf.tidy(() => tf.sigmoid(mm(h, this.dense.get(denseNames.sharedGate(l)))) as T2);
        mlp = tf.mul(ungated, sigmoid) as T2;
        if (mlpCache) mlpCache.gate = { sigmoid, ungated };
        else disposeAll([sigmoid, ungated]);
      }
    };
    if (!moe) {
      computeMlp!();
      return { y: mlp!, ...(mlpCache ? { mlpCache } : {}) };
    }
    let routed;
    try {
      const gateBias = this.family.gateBias ? { gateBias: this.hostWeight(denseNames.gateBias(l)) } : {};
      routed = await moe.forward(h, this.dense.get(denseNames.gate(l)), { ...call, ...gateBias, whileAway: computeMlp });
    } catch (err) {
      disposeAll([mlp, mlpCache]);
      throw err;
    }
    if (!computeMlp) return routed;
    if (!mlp) computeMlp(); // the call never went to the wire
    const y = tf.add(routed.y, mlp!) as T2;
    disposeAll([routed.y, mlp]);
    return { ...routed, y, ...(mlpCache ? { mlpCache } : {}) };
  }

  /**
   * Backward of layer l's router-side MLP from dL/d(its output): weight gradients into `dense`, returns
   * dL/d(its input). With Qwen2-MoE's gate y = σ(x·g) ⊙ u: du = dy ⊙ σ, and x·g gets Σ_row(dy ⊙ u) ⊙ σ(1 − σ).
   */
  private routerMlpBackward(l: number, dy: T2, cache: RouterMlpCache): T2 {
    const gate = cache.gate;
    const grads = tf.tidy(() => {
      let du = dy;
      let dxGate: T2 | undefined;
      let dGate: T2 | undefined;
      if (gate) {
        du = tf.mul(dy, gate.sigmoid) as T2;
        const dz = tf.mul(tf.sum(tf.mul(dy, gate.ungated), 1, true), tf.mul(gate.sigmoid, tf.sub(1, gate.sigmoid))) as T2;
        dGate = mmTA(cache.expert.x, dz);
        dxGate = mm(dz, this.weightT(denseNames.sharedGate(l)));
      }
      const w = (part: 'w1t' | 'w3t' | 'w2t') => this.weightT(denseNames.mlp(l, part));
      const g = expertBackward(du, cache.expert, { w1: w('w1t'), w3: w('w3t'), w2: w('w2t') });
      return { ...g, dx: dxGate ? tf.add(g.dx, dxGate) as T2 : g.dx, ...(dGate ? { dGate } : {}) };
    });
    this.dense.accumulate(denseNames.mlp(l, 'w1t'), grads.dW1t);
    this.dense.accumulate(denseNames.mlp(l, 'w3t'), grads.dW3t);
    this.dense.accumulate(denseNames.mlp(l, 'w2t'), grads.dW2t);
    if (grads.dGate) this.dense.accumulate(denseNames.sharedGate(l), grads.dGate);
    return grads.dx;
  }

  private weightT(name: string): T2 {
    if (this.transposedVersion !== this.dense.version) {
      disposeAll(this.transposed);
      this.transposed = new Map();
      this.transposedVersion = this.dense.version;
    }
    let t = this.transposed.get(name);
    if (!t) {
      t = tf.keep(tf.transpose(this.dense.get<tf.Rank.R2>(name)));
      this.transposed.set(name, t);
    }
    return t;
  }

  private embed(ids: Int32Array): T2 {
    return tf.tensor2d(this.embedRows(ids), [ids.length, this.config.hidden_size]);
  }

  /** A small weight (a norm's) on the host, for the serving step's host-side norms. */
  private hostWeight(name: string): Float32Array {
    if (this.hostWeightsVersion !== this.dense.version) {
      this.hostWeights.clear();
      this.hostWeightsVersion = this.dense.version;
    }
    let w = this.hostWeights.get(name);
    if (!w) {
      w = this.dense.get(name).dataSync() as Float32Array;
      this.hostWeights.set(name, w);
    }
    return w;
  }

  /** The embedding rows of `ids`, on the host. */
  private embedRows(ids: Int32Array): Float32Array {
    const D = this.config.hidden_size;
    const V = this.config.vocab_size;
    if (this.embedVersion !== this.dense.version || !this.embedTable) {
      this.embedTable = this.dense.get(denseNames.embed).dataSync() as Float32Array;
      this.embedVersion = this.dense.version;
    }
    const rows = new Float32Array(ids.length * D);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (!(id >= 0 && id < V)) throw new RangeError(`token id ${id} at position ${i} is outside the vocabulary [0, ${V})`);
      rows.set(this.embedTable.subarray(id * D, id * D + D), i * D);
    }
    return rows;
  }

  /** Layer l's attention weights, with the family's biases and q|k|v transform when it has them. */
  private attentionWeights(l: number): AttentionWeights {
    const w: AttentionWeights = { wqkv: this.dense.get(denseNames.wqkv(l)), wo: this.dense.get(denseNames.wo(l)) };
    if (this.family.attention.oBias) w.bo = this.dense.get(denseNames.bo(l));
    if (this.family.attention.sinks) w.sinks = this.dense.get(denseNames.sinks(l));
    if (this.qkvTransform.active) w.qkv = { transform: this.qkvTransform, params: this.qkvParams(l, (n) => this.dense.get<tf.Rank.R1>(n)) };
    return w;
  }

  /** The parameters layer l's q|k|v transform uses, as `get` gives them (tensors, or host copies for the step). */
  private qkvParams<T>(l: number, get: (name: string) => T): QkvParams<T> {
    const a = this.family.attention;
    return {
      ...(a.qkvBias ? { bias: get(denseNames.bqkv(l)) } : {}),
      ...(a.qkNorm !== 'none' ? { qNorm: get(denseNames.qNorm(l)), kNorm: get(denseNames.kNorm(l)) } : {}),
    };
  }

  private attentionShape(batch: number, tokens: number, past: number, l: number) {
    const c = this.config;
    return { batch, tokens, past, heads: c.num_attention_heads, kvHeads: c.num_key_value_heads, headDim: this.headDim, window: this.family.window(l) };
  }

  /**
   * The LM head in compute layout [hidden, vocab]. Tied embeddings use the embedding's transpose, kept
   * (one extra copy of the embedding) because a plain matMul is the fast path on wasm.
   */
  private lmHead(): T2 {
    return this.config.tie_word_embeddings ? this.weightT(denseNames.embed) : this.dense.get(denseNames.lmHead);
  }

  /**
   * Sequence ranges of a forward's micro-batches. Routing groups stay whole (aux, z and capacity are
   * per-group statistics), so a pass whose group is the whole call (groupTokens 0) runs as one lane,
   * except inference with a dropless gate, whose routing is per token.
   */
  private forwardLanes(batch: number, tokens: number, groupTokens: number, train: boolean): Array<[number, number]> {
    if (this.microBatches <= 1 || batch <= 1) return [[0, batch]];
    const gate = this.config.switchyard_gate;
    let unit = 1; // sequences per indivisible unit
    if (train || !isDropless(gate.policy, gate.drop_tokens)) {
      if (groupTokens <= 0) return [[0, batch]];
      unit = groupTokens / gcd(groupTokens, tokens);
    }
    const units = Math.ceil(batch / unit);
    const lanes = lanesFor(batch * tokens, this.microBatches, this.family.experts, this.family.k, this.minExpertRowsPerLane);
    return splitLanes(units, lanes).map(([a, b]) => [a * unit, Math.min(batch, b * unit)]);
  }

  /** Each MoE layer's training noise for `tokens` tokens, drawn in the order one undivided pass draws it. */
  private drawNoise(tokens: number, opt: PassOptions): Array<LayerNoise | undefined> | undefined {
    const gate = this.config.switchyard_gate;
    const sampling = gate.second_expert_sampling && this.family.k >= 2;
    if (!opt.train || !opt.random || (gate.jitter_eps <= 0 && !sampling)) return undefined;
    return this.moe.map((moe) => moe && {
      jitter: gate.jitter_eps > 0 ? multiplicativeJitter(new Float32Array(tokens * this.config.hidden_size), gate.jitter_eps, opt.random!) : undefined,
      gumbel: sampling ? gumbelNoise(tokens * this.family.experts, opt.random!) : undefined,
    });
  }

  /** The forward split into micro-batches (one lane when it cannot or need not be split). */
  private async forwardInLanes(ids: Int32Array, batch: number, tokens: number, opt: PassOptions, kv?: KvCache[], past = 0): Promise<LaneForwards> {
    if (ids.length !== batch * tokens) throw new RangeError(`expected ${batch}×${tokens} ids, got ${ids.length}`);
    if (past + tokens > this.config.max_position_embeddings)
      throw new RangeError(`sequence length ${past + tokens} exceeds max_position_embeddings ${this.config.max_position_embeddings}`);
    const ranges = kv ? [[0, batch] as [number, number]] : this.forwardLanes(batch, tokens, opt.groupTokens ?? 0, opt.train);
    const noise = ranges.length > 1 ? this.drawNoise(batch * tokens, opt) : undefined;
    const D = this.config.hidden_size;
    const E = this.family.experts;
    const lanes = await ComputeTurns.run(ranges.length, (lane, turns) => {
      const [s0, s1] = ranges[lane];
      const t0 = s0 * tokens;
      const t1 = s1 * tokens;
      const laneOpt: PassOptions = ranges.length === 1 ? opt : {
        ...opt, passId: `${opt.passId}/m${lane}`, ...(opt.rts ? { rts: { ...opt.rts, firstToken: opt.rts.firstToken + t0 } } : {}),
      };
      const laneNoise = noise?.map((n) => n && { jitter: n.jitter?.subarray(t0 * D, t1 * D), gumbel: n.gumbel?.subarray(t0 * E, t1 * E) });
      return this.forwardLane(ids.subarray(t0, t1), s1 - s0, tokens, laneOpt, turns, kv, past, laneNoise);
    }, (done) => disposeAll([done.logits, done.hidden, done.caches, done.finalNorm, done.kv]));
    return { lanes, ranges };
  }

  /**
   * Forward over `batch` sequences of `tokens` new ids each, in `microBatches` lanes where it can be
   * split. With `kv` (one per layer) the call extends cached sequences of length `past` (one lane) and
   * returns the extended caches.
   */
  async forward(ids: Int32Array, batch: number, tokens: number, opt: PassOptions, kv?: KvCache[], past = 0): Promise<ForwardOutput> {
    const { lanes } = await this.forwardInLanes(ids, batch, tokens, opt, kv, past);
    if (lanes.length === 1) return lanes[0];
    if (opt.train) {
      disposeAll(lanes.map((o) => [o.logits, o.hidden, o.caches, o.finalNorm]));
      throw new Error('a split training forward is consumed by lossAndGradients');
    }
    const concat = (parts: tf.Tensor[]) => {
      const whole = tf.concat(parts, 0);
      disposeAll(parts);
      return whole;
    };
    return {
      logits: concat(lanes.map((o) => o.logits)) as T2,
      hidden: concat(lanes.map((o) => o.hidden)) as T2,
      stats: lanes[0].stats.map((_, i) => mergeStats(lanes.map((o) => o.stats[i]))),
      kv: lanes[0].kv.map((_, l) => ({ k: concat(lanes.map((o) => o.kv[l].k)) as tf.Tensor3D, v: concat(lanes.map((o) => o.kv[l].v)) as tf.Tensor3D })),
    };
  }

  /** One lane's forward: it holds `turns` while it computes and gives it up while its rows are away. */
  private async forwardLane(
    ids: Int32Array, batch: number, tokens: number, opt: PassOptions, turns: ComputeTurns, kv: KvCache[] | undefined, past: number, noise?: Array<LayerNoise | undefined>,
  ): Promise<ForwardOutput> {
    const c = this.config;
    const eps = c.rms_norm_eps;
    let x = this.embed(ids);
    const caches: LayerCache[] = [];
    const stats: MoeStats[] = [];
    const newKv: KvCache[] = [];
    for (let l = 0; l < c.num_hidden_layers; l++) {
      const n1 = rmsNormForward(x, this.dense.get(denseNames.attnNorm(l)), eps);
      const attn = attentionForward(n1.y, this.attentionWeights(l), this.attentionShape(batch, tokens, past, l), this.rope, kv?.[l], opt.train);
      n1.y.dispose();
      const x1 = tf.add(x, attn.y) as T2;
      attn.y.dispose();
      x.dispose();
      if (!opt.train) newKv.push(attn.kv);
      const n2 = rmsNormForward(x1, this.dense.get(denseNames.moeNorm(l)), eps);
      const ffn = await this.feedForward(l, n2.y, {
        passId: `${opt.passId}/L${l}`, train: opt.train, groupTokens: opt.groupTokens ?? 0, random: opt.random, rts: opt.rts,
        selectionBias: this.balanceBias?.[l], requestIds: opt.requestIds, deadline: opt.deadline, turns, noise: noise?.[l],
      }).catch((err: unknown) => {
        // Experts unreachable, deadline, overload: free what this pass built so far, then fail.
        disposeAll([x1, n1.cache, attn.cache, n2, newKv, caches]);
        throw err;
      });
      n2.y.dispose();
      x = tf.add(x1, ffn.y) as T2;
      ffn.y.dispose();
      x1.dispose();
      // One entry per MoE layer (family.moeLayers order); dense layers route nothing.
      if (ffn.stats) stats.push(ffn.stats);
      if (!opt.train && ffn.stats) this.onRouting?.(l, ffn.stats);
      if (opt.train) caches.push({ n1: n1.cache, attn: attn.cache!, n2: n2.cache, ...(ffn.cache ? { moe: ffn.cache } : {}), ...(ffn.mlpCache ? { mlp: ffn.mlpCache } : {}) });
      else disposeAll([n1.cache, n2.cache]);
    }
    const nf = rmsNormForward(x, this.dense.get(denseNames.norm), eps);
    x.dispose();
    const logits = mm(nf.y, this.lmHead());
    if (!opt.train) {
      disposeAll(nf.cache);
      return { logits, hidden: nf.y, stats, kv: newKv };
    }
    return { logits, hidden: nf.y, caches, finalNorm: nf.cache, stats, kv: newKv };
  }

  /**
   * One serving step over the paged KV cache (continuous batching): each sequence brings its new ids (a
   * decode token or a prefill chunk) and its block table; K/V of the new ids are written into `store` in
   * place. The norms, projections, gate and MoE run once over every row of the step; attention reads each
   * sequence's own blocks. Returns the last row's logits of the sequences that ask for them.
   */
  async step(seqs: StepSequence[], store: KvStore, passId: string, opt: { requestIds?: string[]; deadline?: number; profile?: StepProfile } = {}): Promise<StepOutput[]> {
    const c = this.config;
    for (const s of seqs) {
      if (s.ids.length === 0) throw new RangeError('a sequence in the step has no new ids');
      if (s.past + s.ids.length > c.max_position_embeddings)
        throw new RangeError(`sequence length ${s.past + s.ids.length} exceeds max_position_embeddings ${c.max_position_embeddings}`);
    }
    // Micro-batches of whole sequences with about as many rows each: each sequence's rows only meet its
    // own blocks, and routing is per token in serving (below), so the split changes no result.
    const rows = seqs.reduce((n, s) => n + s.ids.length, 0);
    const lanes = lanesFor(rows, this.microBatches, this.family.experts, this.family.k, this.minExpertRowsPerLane);
    const ranges = splitLanes(seqs.length, lanes, (i) => seqs[i].ids.length);
    const outputs = await ComputeTurns.run(ranges.length, (lane, turns) =>
      this.stepLane(seqs.slice(...ranges[lane]), store, ranges.length === 1 ? passId : `${passId}/m${lane}`, opt, turns));
    return outputs.flat();
  }

  /** One micro-batch of a serving step; it holds `turns` while it computes. */
  private async stepLane(seqs: StepSequence[], store: KvStore, passId: string, opt: { requestIds?: string[]; deadline?: number; profile?: StepProfile }, turns: ComputeTurns): Promise<StepOutput[]> {
    const c = this.config;
    const eps = c.rms_norm_eps;
    const paged: PagedSequence[] = [];
    let rows = 0;
    for (const s of seqs) {
      paged.push({ row: rows, tokens: s.ids.length, past: s.past, blocks: s.blocks });
      rows += s.ids.length;
    }
    const allIds = new Int32Array(rows);
    seqs.forEach((s, i) => allIds.set(s.ids, paged[i].row));
    const attention = new StepAttention(paged, store, {
      heads: c.num_attention_heads, kvHeads: c.num_key_value_heads, headDim: this.headDim,
      layerWindows: Array.from({ length: c.num_hidden_layers }, (_, l) => this.family.window(l)),
    }, this.rope);
    const degraded: Array<Set<string> | undefined> = seqs.map(() => undefined);
    // Capacity-limited gates route every token as its own group in serving, so a request's output does
    // not depend on its batch-mates or on how its prompt is chunked (docs/serving.md); dropless routing
    // is the same in one group, and cheaper.
    const gate = c.switchyard_gate;
    const groupTokens = isDropless(gate.policy, gate.drop_tokens) ? 0 : 1;
    // The residual stream stays on the host between the matMuls: norms and residual adds are a pass over
    // the rows in JS, cheaper than the half dozen backend ops each costs (the step's per-op overhead).
    const D = c.hidden_size;
    const x = this.embedRows(allIds);
    const upload = (values: Float32Array, width: number) => tf.tensor2d(values, [rows, width]);
    const hostMatMul = (values: Float32Array, width: number, weight: T2): Float32Array => {
      const input = upload(values, width);
      const product = mm(input, weight);
      input.dispose();
      const out = product.dataSync() as Float32Array;
      product.dispose();
      return out;
    };
    try {
      for (let l = 0; l < c.num_hidden_layers; l++) {
        const n1 = rmsNormRows(x, D, this.hostWeight(denseNames.attnNorm(l)), eps);
        const t0 = opt.profile ? performance.now() : 0;
        const qkvRows = hostMatMul(n1, D, this.dense.get(denseNames.wqkv(l)));
        if (this.qkvTransform.active) this.qkvTransform.rows(qkvRows, this.qkvParams(l, (n) => this.hostWeight(n)));
        const t1 = opt.profile ? performance.now() : 0;
        const contextRows = attention.layer(l, qkvRows, this.family.attention.sinks ? this.hostWeight(denseNames.sinks(l)) : undefined);
        if (opt.profile) {
          const t2 = performance.now();
          opt.profile.qkvMs += t1 - t0;
          opt.profile.attentionMs += t2 - t1;
        }
        const attended = hostMatMul(contextRows, c.num_attention_heads * this.headDim, this.dense.get(denseNames.wo(l)));
        if (this.family.attention.oBias) {
          const bias = this.hostWeight(denseNames.bo(l));
          for (let o = 0; o < attended.length; o += D) for (let d = 0; d < D; d++) attended[o + d] += bias[d];
        }
        addInto(x, attended);
        const n2 = upload(rmsNormRows(x, D, this.hostWeight(denseNames.moeNorm(l)), eps), D);
        const t3 = opt.profile ? performance.now() : 0;
        const ffn = await this.feedForward(l, n2, {
          passId: `${passId}/L${l}`, train: false, groupTokens, selectionBias: this.balanceBias?.[l], requestIds: opt.requestIds, deadline: opt.deadline, turns,
        }).finally(() => n2.dispose());
        if (opt.profile) opt.profile.feedForwardMs += performance.now() - t3;
        const moeStats = ffn.stats;
        if (moeStats) this.onRouting?.(l, moeStats);
        const flagged = moeStats?.degradedTokens;
        if (flagged)
          seqs.forEach((s, i) => {
            const from = paged[i].row;
            if (!flagged.subarray(from, from + s.ids.length).some((f) => f === 1)) return;
            degraded[i] ??= new Set();
            for (const r of moeStats!.degradedReasons ?? []) degraded[i]!.add(r);
          });
        addInto(x, ffn.y.dataSync() as Float32Array);
        ffn.y.dispose();
      }
      // Rows through the LM head: each sequence's last new id when it asks for logits, all of them with allLogits.
      const headRows = seqs.map((s) => (s.allLogits ? s.ids.length : s.logits ? 1 : 0));
      const wanted = headRows.reduce((n, r) => n + r, 0);
      let values: Float32Array = new Float32Array(0);
      if (wanted) {
        const picked = new Float32Array(wanted * D);
        let at = 0;
        seqs.forEach((s, i) => {
          const end = paged[i].row + s.ids.length;
          picked.set(x.subarray((end - headRows[i]) * D, end * D), at * D);
          at += headRows[i];
        });
        const normed = tf.tensor2d(rmsNormRows(picked, D, this.hostWeight(denseNames.norm), eps), [wanted, D]);
        const logits = mm(normed, this.lmHead());
        normed.dispose();
        values = logits.dataSync() as Float32Array;
        logits.dispose();
      }
      const V = c.vocab_size;
      const logitsOf = new Map<number, Float32Array>();
      const rowsOf = new Map<number, Float32Array>();
      let at = 0;
      seqs.forEach((s, i) => {
        if (!headRows[i]) return;
        at += headRows[i];
        if (s.logits) logitsOf.set(i, values.slice((at - 1) * V, at * V));
        if (s.allLogits) rowsOf.set(i, values.subarray((at - headRows[i]) * V, at * V));
      });
      return seqs.map((_, i) => ({ logits: logitsOf.get(i), ...(rowsOf.has(i) ? { rowLogits: rowsOf.get(i) } : {}), ...(degraded[i] ? { degraded: [...degraded[i]!] } : {}) }));
    } finally {
      attention.dispose();
    }
  }

  /** Logits for every position (evaluation, no caches kept). */
  async logits(ids: Int32Array, batch: number, tokens: number, passId = 'eval'): Promise<Float32Array> {
    return (await this.logitsWithRouting(ids, batch, tokens, passId)).logits;
  }

  /** Logits for every position and each layer's routing statistics (plans per routing group). */
  async logitsWithRouting(ids: Int32Array, batch: number, tokens: number, passId = 'eval', requestIds?: string[], deadline?: number): Promise<{ logits: Float32Array; routing: MoeStats[] }> {
    const out = await this.forward(ids, batch, tokens, { passId, train: false, requestIds, deadline });
    const values = out.logits.dataSync() as Float32Array;
    disposeAll([out.logits, out.hidden, out.kv]);
    return { logits: values, routing: out.stats };
  }

  /** Mean cross-entropy (nats per token) without gradients. */
  async evalLoss(ids: Int32Array, targets: Int32Array, batch: number, tokens: number, passId = 'eval'): Promise<number> {
    const out = await this.forward(ids, batch, tokens, { passId, train: false });
    try {
      return tf.tidy(() => crossEntropy(out.logits, targets).loss.dataSync()[0]);
    } finally {
      disposeAll([out.logits, out.hidden, out.kv]); // also when the targets do not fit
    }
  }

  /**
   * Forward and backward of one batch; gradients accumulate in `dense` and at the experts' holders.
   * `gradScale` weights this batch's share of the global objective. With `microBatches` > 1 the batch runs
   * as ping-pong lanes (forward, then backward) of whole routing groups; the objective is the same. When it
   * fails (an expert holder lost mid-step), every tensor of the pass is freed and its holders are told to
   * drop what they kept for it; gradients that reached the tables before the failure stay there, for the
   * caller to discard with the step.
   */
  async lossAndGradients(ids: Int32Array, targets: Int32Array, batch: number, tokens: number, opt: PassOptions, gradScale = 1): Promise<LossResult> {
    assertTrainable(this.config);
    const rows = batch * tokens;
    if (targets.length !== rows) throw new RangeError(`expected ${rows} targets, got ${targets.length}`);
    try {
      // A failing forward frees its own tensors.
      const { lanes, ranges } = await this.forwardInLanes(ids, batch, tokens, { ...opt, train: true });
      const stats = lanes[0].stats.map((_, i) => mergeStats(lanes.map((o) => o.stats[i])));
      const gate = this.config.switchyard_gate;
      // aux_loss_scope 'batch': one Mixtral aux loss over every layer's and group's tokens (HF), else per group
      const pooledAux = gate.aux_loss_scope === 'batch' ? pooledAuxTotals(stats.flatMap((s) => s.plans), this.family.experts) : undefined;
      const groups = stats.map((s) => s.plans.length);
      const crossEntropies = await ComputeTurns.run(lanes.length, (lane, turns) => {
        const [t0, t1] = ranges[lane].map((s) => s * tokens);
        return this.backward(lanes[lane], ids.subarray(t0, t1), targets.subarray(t0, t1), gradScale, { crossEntropyShare: (t1 - t0) / rows, pooledAux, groups, turns });
      });
      // Each lane's mean cross-entropy, weighted by its rows: the mean over the batch.
      const crossEntropyValue = crossEntropies.reduce((sum, ce, lane) => sum + ce * ((ranges[lane][1] - ranges[lane][0]) * tokens / rows), 0);
      let aux = 0;
      let z = 0;
      for (const s of stats) {
        aux += s.auxLoss;
        z += s.zLoss;
      }
      if (pooledAux) aux = pooledAuxLoss(pooledAux);
      return {
        loss: crossEntropyValue + gate.aux_loss_coef * aux + gate.z_loss_coef * z,
        crossEntropy: crossEntropyValue, auxLoss: aux, zLoss: z, layerStats: stats,
      };
    } catch (err) {
      // No complete backward will come: holders free the activations saved for the pass's layers.
      this.transport.dropPass?.(opt.passId);
      throw err;
    }
  }

  /**
   * The backward of one lane's training forward; returns its mean cross-entropy. `pass.crossEntropyShare`:
   * the lane's rows over the pass's (the pass's cross-entropy is the mean over all rows); `pass.groups`:
   * routing groups per MoE layer over the whole pass (aux and z are means over them). Frees every tensor
   * of `out`, also when it fails.
   */
  private async backward(
    out: ForwardOutput, ids: Int32Array, targets: Int32Array, gradScale: number,
    pass: { crossEntropyShare: number; pooledAux?: PooledAuxTotals; groups: number[]; turns: ComputeTurns },
  ): Promise<number> {
    const c = this.config;
    const gate = c.switchyard_gate;
    const caches = out.caches!;
    // The gradient flowing down the layers, freed with the layers' caches the backward has not reached
    // when it fails (experts unreachable, bad targets).
    let dx: T2 | undefined;
    try {
      const { loss: ceT, dLogits } = crossEntropy(out.logits, targets, gradScale * pass.crossEntropyShare);
      const crossEntropyValue = ceT.dataSync()[0];
      ceT.dispose();
      out.logits.dispose();
      const dLm = mmTA(out.hidden, dLogits);
      this.dense.accumulate(denseNames.lmHead, dLm);
      const dHidden = mm(dLogits, this.weightT(denseNames.lmHead));
      dLogits.dispose();
      out.hidden.dispose();
      const nf = rmsNormBackward(dHidden, out.finalNorm!, this.dense.get(denseNames.norm));
      dHidden.dispose();
      disposeAll(out.finalNorm);
      this.dense.accumulate(denseNames.norm, nf.dWeight);
      dx = nf.dx;
      for (let l = c.num_hidden_layers - 1; l >= 0; l--) {
        const lc = caches[l];
        // The feed-forward block's input gradient: routed experts' (MoE layers) plus the router-side MLP's.
        let dFfn: T2 | undefined;
        const layerMoe = this.moe[l];
        if (layerMoe) {
          const moe = await layerMoe.backward(dx, lc.moe!, this.weightT(denseNames.gate(l)), gate.aux_loss_coef * gradScale, gate.z_loss_coef * gradScale, pass.pooledAux,
            { turns: pass.turns, groups: pass.groups[this.family.moeLayers.indexOf(l)] });
          this.dense.accumulate(denseNames.gate(l), moe.dGate);
          dFfn = moe.dh;
        }
        if (lc.mlp) {
          const dMlp = this.routerMlpBackward(l, dx, lc.mlp);
          disposeAll(lc.mlp);
          if (dFfn) {
            const sum = tf.add(dFfn, dMlp) as T2;
            disposeAll([dFfn, dMlp]);
            dFfn = sum;
          } else dFfn = dMlp;
        }
        const n2 = rmsNormBackward(dFfn!, lc.n2, this.dense.get(denseNames.moeNorm(l)));
        dFfn!.dispose();
        this.dense.accumulate(denseNames.moeNorm(l), n2.dWeight);
        const dx1 = tf.add(dx, n2.dx) as T2;
        dx.dispose();
        n2.dx.dispose();
        const weights = this.attentionWeights(l);
        const attn = attentionBackward(dx1, lc.attn, { wqkvT: this.weightT(denseNames.wqkv(l)), woT: this.weightT(denseNames.wo(l)), qkv: weights.qkv, oBias: weights.bo !== undefined }, this.rope);
        this.dense.accumulate(denseNames.wqkv(l), attn.dWqkv);
        this.dense.accumulate(denseNames.wo(l), attn.dWo);
        if (attn.dBo) this.dense.accumulate(denseNames.bo(l), attn.dBo);
        if (attn.dQkv?.bias) this.dense.accumulate(denseNames.bqkv(l), attn.dQkv.bias);
        if (attn.dQkv?.qNorm) this.dense.accumulate(denseNames.qNorm(l), attn.dQkv.qNorm);
        if (attn.dQkv?.kNorm) this.dense.accumulate(denseNames.kNorm(l), attn.dQkv.kNorm);
        const n1 = rmsNormBackward(attn.dh, lc.n1, this.dense.get(denseNames.attnNorm(l)));
        attn.dh.dispose();
        this.dense.accumulate(denseNames.attnNorm(l), n1.dWeight);
        dx = tf.add(dx1, n1.dx) as T2;
        dx1.dispose();
        n1.dx.dispose();
        disposeAll([lc.n1, lc.attn, lc.n2]);
      }
      this.accumulateEmbedding(ids, dx);
      dx.dispose();
      return crossEntropyValue;
    } catch (err) {
      // Tensors already freed on the way down are skipped (disposing twice is harmless).
      disposeAll([out.logits, out.hidden, out.finalNorm, caches, dx]);
      throw err;
    }
  }

  private accumulateEmbedding(ids: Int32Array, dx: T2): void {
    const D = this.config.hidden_size;
    const rows = dx.dataSync() as Float32Array;
    const grad = new Float32Array(this.config.vocab_size * D);
    for (let i = 0; i < ids.length; i++) {
      const o = ids[i] * D;
      const s = i * D;
      for (let d = 0; d < D; d++) grad[o + d] += rows[s + d];
    }
    this.dense.accumulate(denseNames.embed, tf.tensor2d(grad, [this.config.vocab_size, D]));
  }

  /** After an optimizer step: move the aux-loss-free balancing bias by this step's loads (per MoE layer, before dropping). */
  updateBalance(countsBeforeDrop: Int32Array[]): void {
    if (!this.balanceBias) return;
    const rate = this.config.switchyard_gate.balance_bias_rate;
    countsBeforeDrop.forEach((counts, i) => updateBalanceBias(this.balanceBias![this.family.moeLayers[i]], counts, rate));
  }

  dispose(): void {
    disposeAll(this.transposed);
    this.dense.dispose();
    this.localExperts?.dispose();
  }
}

/** Mean cross-entropy over rows and its gradient w.r.t. the logits (scaled by gradScale). */
export function crossEntropy(logits: T2, targets: Int32Array, gradScale = 1): { loss: tf.Scalar; dLogits: T2 } {
  return tf.tidy(() => {
    const [rows, vocab] = logits.shape;
    if (targets.length !== rows) throw new RangeError(`expected ${rows} targets, got ${targets.length}`);
    const logp = tf.logSoftmax(logits);
    const oneHot = tf.oneHot(tf.tensor1d(targets, 'int32'), vocab);
    const loss = tf.neg(tf.div(tf.sum(tf.mul(oneHot, logp)), rows)) as tf.Scalar;
    const dLogits = tf.mul(tf.sub(tf.exp(logp), oneHot), gradScale / rows) as T2;
    return { loss, dLogits };
  });
}
