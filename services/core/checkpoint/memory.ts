// What serving a model takes in memory, per service, on a compute backend: the float32 weights each
// process keeps on its backend plus the working tensors of one step, and what the process keeps in host
// memory besides. On wasm the backend's memory is a 32-bit heap of at most 4 GiB per process
// (tfjs-backend-wasm's module allows 65 536 pages of 64 KiB), so a router whose dense part or a shard
// whose experts do not fit are refused up front (`switchyard import`), naming the numbers.
import { createRequire } from 'node:module';
import { headDim, type ModelConfig } from '../config.js';
import { familyOf } from '../model/family.js';
import { BACKEND_CHOICES, type BackendChoice } from '../backend.js';

/** The most a wasm process's heap can hold. */
export const WASM_HEAP_BYTES = 4 * 2 ** 30;
/** Rows of one serving step (the router's default --max-batched-tokens). */
export const STEP_ROWS = 2048;
/** Sequences whose next-token logits one step computes (the router's default --max-batch). */
export const STEP_SEQUENCES = 64;
/** Rows a shard computes in one turn at most (services/expert/shard.ts merges queued messages up to this). */
export const SHARD_TURN_ROWS = 8192;

export interface ServiceMemory {
  /** 'router' or the shard's spread name `spread:i/N`. */
  service: string;
  /** Float32 weights the process keeps on its backend. */
  weightBytes: number;
  /** Working tensors of one step at the defaults (STEP_ROWS rows; SHARD_TURN_ROWS for a shard). */
  workBytes: number;
  /** Weights + work: what the backend must hold (the wasm heap, the GPU). */
  backendBytes: number;
  /** Host memory besides the backend: the router's host copy of the embedding table (its KV cache is sized apart, --kv-cache-tokens). */
  hostBytes: number;
}

export interface MemoryPlan {
  backend: BackendChoice;
  /** The per-process limit of the backend's memory, when it has one this tool can know (wasm). */
  limitBytes?: number;
  services: ServiceMemory[];
  /** One message per service that cannot fit, naming the numbers and what to do. */
  problems: string[];
}

/**
 * The backend a service started here would use: SWITCHYARD_BACKEND when set, else the first of the
 * native packages that is installed, else wasm (what initBackend picks, without starting it).
 */
export function selectedBackend(forced: string | undefined = process.env.SWITCHYARD_BACKEND): BackendChoice {
  if (forced) {
    if (!(BACKEND_CHOICES as readonly string[]).includes(forced)) throw new RangeError(`backend '${forced}' is not one of ${BACKEND_CHOICES.join(', ')}`);
    return forced as BackendChoice;
  }
  const require = createRequire(import.meta.url);
  for (const [choice, pkg] of [['tensorflow-gpu', '@tensorflow/tfjs-node-gpu'], ['tensorflow', '@tensorflow/tfjs-node']] as const) {
    try {
      require.resolve(pkg);
      return choice;
    } catch {
      // not installed
    }
  }
  return 'wasm';
}

/** Working bytes of one router step of `rows` rows: activations of attention, gate and router-side MLP, and the LM head's logits. */
export function routerWorkBytes(c: ModelConfig, rows = STEP_ROWS, sequences = STEP_SEQUENCES): number {
  const family = familyOf(c);
  const hd = headDim(c);
  const qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
  const mlp = Math.max(0, ...Array.from({ length: family.layers }, (_, l) => family.routerMlpWidth(l)));
  // Residual, normed input and combined MoE output (hidden each), q|k|v, attention output, gate logits,
  // the router-side MLP's three intermediate tensors; one layer's worth lives at a time.
  const perRow = 3 * c.hidden_size + qkv + c.num_attention_heads * hd + family.experts + 3 * mlp;
  return 4 * (rows * perRow + sequences * c.vocab_size);
}

/** Working bytes of one shard turn: rows in and out, and an expert's gate, up and product tensors. */
export function shardWorkBytes(c: ModelConfig, rows = SHARD_TURN_ROWS): number {
  return 4 * rows * (2 * c.hidden_size + 3 * familyOf(c).expertIntermediate);
}

const gb = (bytes: number) => `${(bytes / 1e9).toFixed(2)} GB`;

/**
 * The memory plan of a router and of each shard when `expertFloat32Bytes[i]` are shard i's experts
 * (float32) and `denseFloat32Bytes` the dense part.
 */
export function memoryPlan(c: ModelConfig, denseFloat32Bytes: number, expertFloat32Bytes: number[], backend: BackendChoice): MemoryPlan {
  const limitBytes = backend === 'wasm' ? WASM_HEAP_BYTES : undefined;
  const routerWork = routerWorkBytes(c);
  const shardWork = shardWorkBytes(c);
  const n = expertFloat32Bytes.length;
  const services: ServiceMemory[] = [
    { service: 'router', weightBytes: denseFloat32Bytes, workBytes: routerWork, backendBytes: denseFloat32Bytes + routerWork, hostBytes: 4 * c.vocab_size * c.hidden_size },
    ...expertFloat32Bytes.map((bytes, i) => ({ service: `spread:${i}/${n}`, weightBytes: bytes, workBytes: shardWork, backendBytes: bytes + shardWork, hostBytes: 0 })),
  ];
  const problems: string[] = [];
  if (limitBytes !== undefined) {
    const [router, ...shards] = services;
    if (router.backendBytes > limitBytes)
      problems.push(`on the ${backend} backend a process holds at most ${gb(limitBytes)} (a 4 GiB heap), but a router needs ${gb(router.backendBytes)} ` +
        `(${gb(router.weightBytes)} of dense weights as float32 + ${gb(router.workBytes)} for a ${STEP_ROWS}-token step): ` +
        'the dense part cannot be split, so run routers on a native backend (SWITCHYARD_BACKEND=tensorflow or tensorflow-gpu)');
    const over = shards.filter((s) => s.backendBytes > limitBytes);
    if (over.length) {
      const worst = over.reduce((a, b) => (b.backendBytes > a.backendBytes ? b : a));
      const allExperts = expertFloat32Bytes.reduce((a, b) => a + b, 0);
      const room = limitBytes - shardWork;
      const needed = room > 0 ? Math.ceil(allExperts / room) : undefined;
      problems.push(`on the ${backend} backend a process holds at most ${gb(limitBytes)} (a 4 GiB heap), but ${over.length} of ${n} expert shard(s) need more, ` +
        `up to ${gb(worst.backendBytes)} (${worst.service}: ${gb(worst.weightBytes)} of experts as float32 + ${gb(worst.workBytes)} for a ${SHARD_TURN_ROWS}-row turn): ` +
        (needed !== undefined ? `spread the experts over at least ${needed} shards (--shards ${needed}), or run shards on a native backend` : 'run shards on a native backend'));
    }
  }
  return { backend, ...(limitBytes !== undefined ? { limitBytes } : {}), services, problems };
}
