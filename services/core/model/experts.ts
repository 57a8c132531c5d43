// Experts as a service-agnostic set of (layer, expert) pairs, and the transport interface through which
// the MoE layer reaches them (DESIGN §14). The in-process transport calls an ExpertSet directly; the gRPC
// transport of the serving cluster sends the same row batches to shards that hold ExpertSets.
import * as tf from '@tensorflow/tfjs-core';
import { ParameterTable } from './parameters.js';
import { expertOfCheckpoint, type HostExpert, type HostTensor } from './hf.js';
import type { ModelFamily } from './family.js';
import type { StoredTensor } from '../checkpoint/safetensors.js';
import {
  BIAS_PARTS, SILU, describeActivation, expertBackward, expertForward, sameActivation, transposeExpert,
  type ExpertActivation, type ExpertCache, type ExpertParams, type ExpertWeightsT,
} from './expert.js';
import { disposeAll } from './tensors.js';
import type { OverflowPolicy, Unserved } from '../overload.js';
import { expertKeyText } from '../placement.js';

/** Rows for one (layer, expert): `rowCount` rows of `hidden` floats, row-major. */
export interface RowBatch {
  layer: number;
  expert: number;
  rowCount: number;
  rows: Float32Array;
}

/** What a call is for, beyond its rows: the client requests (x-request-id) it serves, for logs. */
export interface CallContext {
  requestIds?: string[];
  /** Epoch ms after which no request of the call waits for the answer any more. */
  deadline?: number;
}

export interface ExpertTransport {
  /** Output rows per batch. With `train`, the holder keeps what backward needs under `passId`. */
  forward(passId: string, batches: RowBatch[], train: boolean, context?: CallContext): Promise<Float32Array[]>;
  /** Input-row gradients for output-row gradients of batches forwarded earlier under `passId`; weight gradients accumulate at the holder. */
  backward(passId: string, batches: RowBatch[], context?: CallContext): Promise<Float32Array[]>;
  /**
   * The pass `passId` and its sub-passes (`passId/…`) will get no backward (their step failed): forget
   * what their training forwards kept. Remote holders learn it from the training protocol instead.
   */
  dropPass?(passId: string): void;
  /**
   * Inference forward that may leave batches unserved (no live holder, out of credits) instead of
   * failing the call; transports that cannot lose holders need not implement it.
   */
  serve?(passId: string, batches: RowBatch[], context?: CallContext): Promise<Array<Float32Array | Unserved>>;
  /** What the MoE block does with unserved rows. */
  readonly overflow?: OverflowPolicy;
  /** Rows leave the process: a caller lets the sends reach the sockets before computing on (pipeline.ts). */
  readonly remote?: boolean;
}

/** A backward for rows whose forward this holder never saw (or already consumed). */
export class MissingPassError extends Error {
  override name = 'MissingPassError';
}

/** Whether `passId` is the pass `scope` or one of its sub-passes (a model's layers call theirs `scope/L<l>`). */
export const withinPass = (passId: string, scope: string): boolean => passId === scope || passId.startsWith(`${scope}/`);

const MATRIX_PARTS = ['w1t', 'w3t', 'w2t'] as const;
/** One parameter of an expert: a matrix, or a bias (GPT-OSS). */
export type ExpertPart = (typeof MATRIX_PARTS)[number] | (typeof BIAS_PARTS)[number];

export const expertParamName = (layer: number, expert: number, part: ExpertPart): string =>
  `layers.${layer}.experts.${expert}.${part}`;

/** An expert's weights in host memory, compute layout, with the biases it has (what loaders produce). */
export type HostExpertParams = HostExpert & { b1?: HostTensor; b3?: HostTensor; b2?: HostTensor };

const keyOf = (layer: number, expert: number): string => expertKeyText({ layer, expert });

export class ExpertSet {
  readonly params = new ParameterTable();
  /** Held experts by key, each with its parameter parts (the matrices, then the biases it has). */
  private readonly held = new Map<string, readonly ExpertPart[]>();
  private readonly caches = new Map<string, ExpertCache>();
  private transposed = new Map<string, ExpertWeightsT>();
  private transposedVersion = -1;

  /** `activation`: what every expert of the set computes between its projections (its family's expertActivation). */
  constructor(readonly hidden: number, readonly intermediate: number, readonly activation: ExpertActivation = SILU) {}

  add(layer: number, expert: number, w: ExpertParams): void {
    const widths = { b1: this.intermediate, b3: this.intermediate, b2: this.hidden };
    for (const part of BIAS_PARTS) {
      const b = w[part];
      if (b && (b.rank !== 1 || b.shape[0] !== widths[part]))
        throw new RangeError(`expert (layer ${layer}, expert ${expert}): bias ${part} has shape [${b.shape.join(', ')}], expected [${widths[part]}]`);
    }
    const parts = [...MATRIX_PARTS, ...BIAS_PARTS.filter((part) => w[part] !== undefined)];
    for (const part of parts) this.params.define(expertParamName(layer, expert, part), w[part]!);
    this.held.set(keyOf(layer, expert), parts);
  }

  /** Adds an expert from host tensors in compute layout (e.g. gptOssExpertFromHf's result). */
  addHost(layer: number, expert: number, w: HostExpertParams): void {
    const matrix = (t: HostTensor) => tf.tensor2d(t.values, t.shape as [number, number]);
    const vector = (t: HostTensor | undefined) => (t ? tf.tensor1d(t.values) : undefined);
    this.add(layer, expert, { w1t: matrix(w.w1t), w3t: matrix(w.w3t), w2t: matrix(w.w2t), b1: vector(w.b1), b3: vector(w.b3), b2: vector(w.b2) });
  }

  /** Adds an expert from a checkpoint's Hugging Face tensors, in the family's names and layout. */
  addFromHf(tensors: ReadonlyMap<string, StoredTensor>, layer: number, expert: number, family: ModelFamily): void {
    this.addHost(layer, expert, expertOfCheckpoint(family, tensors, layer, expert));
  }

  /** Moves every expert of `other` into this set (a shard taking on experts it just loaded), biases included. */
  adopt(other: ExpertSet): void {
    if (!sameActivation(this.activation, other.activation))
      throw new Error(`cannot adopt experts computing ${describeActivation(other.activation)} into a set computing ${describeActivation(this.activation)}`);
    for (const { layer, expert } of other.keys()) {
      const w = {} as Record<ExpertPart, tf.Tensor>;
      for (const part of other.partsHeld(layer, expert)) w[part] = other.params.take(expertParamName(layer, expert, part));
      other.held.delete(keyOf(layer, expert));
      this.add(layer, expert, w as unknown as ExpertParams);
    }
  }

  /** Forgets an expert and frees its weights (activations of passes in flight stay until dropPass). */
  remove(layer: number, expert: number): void {
    if (!this.holds(layer, expert)) return;
    for (const n of this.paramNames(layer, expert)) this.params.take(n).dispose();
    this.held.delete(keyOf(layer, expert));
  }

  holds(layer: number, expert: number): boolean {
    return this.held.has(keyOf(layer, expert));
  }

  keys(): Array<{ layer: number; expert: number }> {
    return [...this.held.keys()].map((k) => {
      const [layer, expert] = k.split('/').map(Number);
      return { layer, expert };
    });
  }

  /** The expert's matrices, and its biases when it has them. */
  weights(layer: number, expert: number): ExpertParams {
    const w = {} as Record<ExpertPart, tf.Tensor>;
    for (const part of this.partsHeld(layer, expert)) w[part] = this.params.get(expertParamName(layer, expert, part));
    return w as unknown as ExpertParams;
  }

  /** Parameter names of one expert, in the order gradients and digests use: w1t, w3t, w2t, then its biases. */
  paramNames(layer: number, expert: number): string[] {
    return this.partsHeld(layer, expert).map((part) => expertParamName(layer, expert, part));
  }

  private partsHeld(layer: number, expert: number): readonly ExpertPart[] {
    const parts = this.held.get(keyOf(layer, expert));
    if (!parts) throw new Error(`expert (layer ${layer}, expert ${expert}) is not held here`);
    return parts;
  }

  /** SHA-256 of the expert's weights: replicas that must be identical compare these. */
  digest(layer: number, expert: number): string {
    return this.params.digest(this.paramNames(layer, expert));
  }

  private weightsT(layer: number, expert: number): ExpertWeightsT {
    if (this.transposedVersion !== this.params.version) {
      disposeAll(this.transposed);
      this.transposed = new Map();
      this.transposedVersion = this.params.version;
    }
    const key = keyOf(layer, expert);
    let wT = this.transposed.get(key);
    if (!wT) {
      wT = transposeExpert(this.weights(layer, expert));
      this.transposed.set(key, wT);
    }
    return wT;
  }

  private checkRows(b: RowBatch): void {
    if (b.rows.length !== b.rowCount * this.hidden)
      throw new RangeError(`batch for (layer ${b.layer}, expert ${b.expert}) has ${b.rows.length} floats, expected ${b.rowCount}×${this.hidden}`);
  }

  /**
   * One upload (the rows), one matMul chain, one readback. The weights are not uploaded per call: they
   * stay on the backend as the parameter table's tensors from load to removal (and the transposed copies
   * backward uses are cached until the weights change, see weightsT).
   */
  forwardRows(passId: string, b: RowBatch, train: boolean): Float32Array {
    this.checkRows(b);
    const w = this.weights(b.layer, b.expert);
    const x = tf.tensor2d(b.rows, [b.rowCount, this.hidden]);
    let result: ReturnType<typeof expertForward>;
    try {
      result = expertForward(x, w, train, this.activation);
    } finally {
      x.dispose(); // also when a forward-only expert refuses a training pass
    }
    const { y, cache } = result;
    const out = y.dataSync() as Float32Array;
    y.dispose();
    if (cache) {
      const key = `${passId}|${keyOf(b.layer, b.expert)}`;
      if (this.caches.has(key)) throw new Error(`pass ${passId} already forwarded (layer ${b.layer}, expert ${b.expert})`);
      this.caches.set(key, cache);
    }
    return out;
  }

  backwardRows(passId: string, b: RowBatch): Float32Array {
    this.checkRows(b);
    const key = `${passId}|${keyOf(b.layer, b.expert)}`;
    const cache = this.caches.get(key);
    if (!cache) throw new MissingPassError(`no training forward of pass ${passId} for (layer ${b.layer}, expert ${b.expert}) to take gradients of`);
    if (cache.x.shape[0] !== b.rowCount) throw new RangeError(`backward has ${b.rowCount} rows, forward had ${cache.x.shape[0]}`);
    this.caches.delete(key);
    const dy = tf.tensor2d(b.rows, [b.rowCount, this.hidden]);
    const { dx, dW1t, dW3t, dW2t } = expertBackward(dy, cache, this.weightsT(b.layer, b.expert));
    dy.dispose();
    disposeAll(cache);
    this.params.accumulate(expertParamName(b.layer, b.expert, 'w1t'), dW1t);
    this.params.accumulate(expertParamName(b.layer, b.expert, 'w3t'), dW3t);
    this.params.accumulate(expertParamName(b.layer, b.expert, 'w2t'), dW2t);
    const out = dx.dataSync() as Float32Array;
    dx.dispose();
    return out;
  }

  /**
   * Frees the activations saved for a pass and its sub-passes (`passId/…`) that will get no backward:
   * its step failed, or its training attempt ended.
   */
  dropPass(passId: string): void {
    for (const [key, cache] of this.caches)
      if (withinPass(key.slice(0, key.lastIndexOf('|')), passId)) {
        disposeAll(cache);
        this.caches.delete(key);
      }
  }

  dispose(): void {
    for (const c of this.caches.values()) disposeAll(c);
    this.caches.clear();
    disposeAll(this.transposed);
    this.params.dispose();
    this.held.clear();
  }
}

export class InProcessTransport implements ExpertTransport {
  constructor(readonly experts: ExpertSet) {}

  async forward(passId: string, batches: RowBatch[], train: boolean): Promise<Float32Array[]> {
    return batches.map((b) => this.experts.forwardRows(passId, b, train));
  }

  async backward(passId: string, batches: RowBatch[]): Promise<Float32Array[]> {
    return batches.map((b) => this.experts.backwardRows(passId, b));
  }

  dropPass(passId: string): void {
    this.experts.dropPass(passId);
  }
}

