// What a model folder holds and what serving it costs, computed from config.json and the safetensors
// headers only (no tensor data): `switchyard import` prints it before anything is started.
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { headDim } from '../config.js';
import { familyOf, type ModelFamily } from '../model/family.js';
import { spreadExperts } from '../placement.js';
import type { CheckpointLayout } from './index.js';
import { numElements } from './safetensors.js';
import { TOKENIZER_FILE } from '../tokenizer/hf.js';
import type { TextTokenizer } from '../tokenizer/types.js';


/** Stored bytes and the float32 bytes they become in memory (every dtype is converted for compute). */
export interface ByteSize { stored: number; float32: number }

export interface ShardFootprint {
  /** Shard index i of `spread:i/N`. */
  shard: number;
  experts: number;
  bytes: ByteSize;
}

export interface ModelSummary {
  dir: string;
  modelType: string;
  layers: number;
  experts: number;
  expertsPerToken: number;
  hiddenSize: number;
  intermediateSize: number;
  headDim: number;
  vocabSize: number;
  tiedEmbeddings: boolean;
  /** Undefined: full causal attention (or per-layer windows, below). */
  slidingWindow?: number;
  /** Windows that differ by layer (GPT-OSS), in words. */
  layerWindows?: string;
  /** What the family adds to Llama attention (q/k/v biases, q/k norms, clamp), in words; empty for none. */
  attentionExtras: string[];
  /** Layers with routed experts, and the others' dense MLP width. */
  moeLayers: number[];
  denseLayers: Array<{ layer: number; width: number }>;
  /** Router-side shared experts of an MoE layer: total width and whether a sigmoid gate scales them. */
  sharedExperts?: { width: number; gated: boolean };
  /** What one expert computes, in words; and whether the router adds a bias. */
  expertKind: string;
  routerBias: boolean;
  /** Whether the k chosen weights are renormalised to sum to 1 (norm_topk_prob). */
  renormalize: boolean;
  torchDtype: string;
  /** Dtypes found in the safetensors headers. */
  dtypes: string[];
  parameters: { total: number; perExpert: number; allExperts: number; dense: number };
  files: Array<{ name: string; bytes: number }>;
  /** Everything but the experts: what each router holds. */
  dense: ByteSize;
  /** Expert bytes per shard when the experts are spread over `shards.length` shards as `spread:i/N`. */
  shards: ShardFootprint[];
  /** The tokenizer completions use: the folder's tokenizer.json (file set) or the byte vocabulary. */
  tokenizer: { file?: string; ids: number };
}

/** One window for every layer, or (GPT-OSS) the layers that slide. */
function windowOf(family: ModelFamily): { slidingWindow?: number; layerWindows?: string } {
  const windows = Array.from({ length: family.layers }, (_, l) => family.window(l));
  if (windows.every((w) => w === windows[0])) return windows[0] === undefined ? {} : { slidingWindow: windows[0] };
  const sliding = windows.flatMap((w, l) => (w === undefined ? [] : [l]));
  return { layerWindows: `sliding window ${windows[sliding[0]]} in layers ${sliding.join(', ')}, full causal in the others` };
}

function attentionExtras(family: ModelFamily): string[] {
  const a = family.attention;
  return [
    ...(a.sinks ? ['attention sinks'] : []),
    ...(a.qkvBias ? ['q/k/v biases'] : []),
    ...(a.oBias ? ['o_proj bias'] : []),
    ...(a.qkNorm === 'head' ? ['q/k RMSNorm per head'] : a.qkNorm === 'whole' ? ['q/k RMSNorm over the whole projection'] : []),
    ...(a.clip !== undefined ? [`q/k/v clipped to ±${a.clip}`] : []),
  ];
}

const size = (elements: number, bytes: number): ByteSize => ({ stored: bytes, float32: elements * 4 });

/** Summarises a checked layout (inspectModel) and its loaded tokenizer; `shardCount` shards as `spread:i/N` places experts. */
export async function summarizeModel(layout: CheckpointLayout, shardCount: number, tokenizer: TextTokenizer): Promise<ModelSummary> {
  const c = layout.config;
  const family = familyOf(c);
  const D = c.hidden_size;
  const I = family.expertIntermediate;
  let denseElements = 0;
  let totalBytes = 0;
  const dtypes = new Set<string>();
  for (const [name, { info }] of layout.tensors) {
    if (!family.names.isExpertTensor(name)) denseElements += numElements(info.shape);
    totalBytes += info.end - info.begin;
    dtypes.add(info.dtype);
  }
  /**
   * Parameters and stored bytes of routed expert e of MoE layer l. Fused experts (GPT-OSS) share their
   * layer's tensors, MXFP4 packs two values a byte: the parameters come from the shapes, the bytes are
   * the layer's over its experts.
   */
  const expertSize = (l: number, e: number) => {
    let bytes = 0;
    let elements = 0;
    for (const name of family.names.expertTensors(l, e)) {
      const { info } = layout.tensors.get(name)!;
      bytes += info.end - info.begin;
      elements += numElements(info.shape);
    }
    if (!family.fusedExperts) return { elements, bytes };
    return { elements: 3 * D * I + (family.expertActivation.kind === 'clamped-swiglu' ? 2 * I + D : 0), bytes: bytes / family.experts };
  };
  const spread = spreadExperts(family.moeLayers, family.experts, shardCount);
  let expertElements = 0;
  let expertBytes = 0;
  const shards = spread.map((keys, shard) => {
    let elements = 0;
    let bytes = 0;
    for (const { layer, expert } of keys) {
      const e = expertSize(layer, expert);
      elements += e.elements;
      bytes += e.bytes;
    }
    expertElements += elements;
    expertBytes += bytes;
    return { shard, experts: keys.length, bytes: size(elements, bytes) };
  });
  const denseBytes = totalBytes - expertBytes;
  const total = denseElements + expertElements;
  const weightFiles = [...new Set([...layout.tensors.values()].map((t) => t.file))].sort();
  const files = await Promise.all([...weightFiles].map(async (name) => ({ name, bytes: (await stat(join(layout.dir, name))).size })));
  return {
    dir: layout.dir,
    modelType: c.model_type,
    layers: c.num_hidden_layers,
    experts: family.experts,
    expertsPerToken: c.num_experts_per_tok,
    hiddenSize: c.hidden_size,
    intermediateSize: family.expertIntermediate,
    headDim: headDim(c),
    vocabSize: c.vocab_size,
    tiedEmbeddings: c.tie_word_embeddings,
    ...windowOf(family),
    attentionExtras: attentionExtras(family),
    moeLayers: [...family.moeLayers],
    denseLayers: Array.from({ length: family.layers }, (_, l) => l).filter((l) => !family.isMoe(l)).map((layer) => ({ layer, width: family.routerMlpWidth(layer) })),
    ...(family.moeLayers.length && family.routerMlpWidth(family.moeLayers[0]) > 0
      ? { sharedExperts: { width: family.routerMlpWidth(family.moeLayers[0]), gated: family.sharedExpertGate } } : {}),
    renormalize: family.renormalize,
    expertKind: family.expertActivation.kind === 'silu' ? 'SwiGLU'
      : `clamped SwiGLU (alpha ${family.expertActivation.alpha}, limit ${family.expertActivation.limit}) with biases${family.fusedExperts ? ', fused per layer' : ''}`,
    routerBias: family.gateBias,
    torchDtype: c.torch_dtype,
    dtypes: [...dtypes].sort(),
    parameters: { total, perExpert: expertSize(family.moeLayers[0] ?? 0, 0).elements, allExperts: expertElements, dense: denseElements },
    files,
    dense: size(denseElements, denseBytes),
    shards,
    // loadTokenizer reads tokenizer.json whenever the folder has one.
    tokenizer: { ...(layout.files.includes(TOKENIZER_FILE) ? { file: TOKENIZER_FILE } : {}), ids: tokenizer.vocabSize },
  };
}
