// Compute backend selection (DESIGN §8): native TensorFlow (GPU, then CPU) where its optional package
// installed, else wasm (SIMD), else the pure-JS cpu backend as a last resort.
import * as tf from '@tensorflow/tfjs-core';
import { createRequire } from 'node:module';
import { prepareWasmThreads, threadedStart } from './wasm-threads.js';

export const BACKEND_CHOICES = ['tensorflow-gpu', 'tensorflow', 'wasm', 'cpu'] as const;
export type BackendChoice = (typeof BACKEND_CHOICES)[number];

export interface BackendInfo {
  /** What was asked for or found: one of BACKEND_CHOICES. */
  choice: BackendChoice;
  /** tfjs's own backend name ('tensorflow', 'wasm' or 'cpu'). */
  tfjsBackend: string;
  threads: number;
  simd: boolean;
  /** Why earlier candidates were skipped, for the start-up line. */
  skipped: string[];
}

let active: BackendInfo | undefined;
const require = createRequire(import.meta.url);

async function tryNative(pkg: string): Promise<void> {
  // The native packages register the 'tensorflow' backend on import; they are optional dependencies
  // whose install downloads libtensorflow, so they are often absent.
  require.resolve(pkg);
  await import(pkg);
  if (!(await tf.setBackend('tensorflow'))) throw new Error('backend refused to initialise');
}

/** Threads requested for wasm: SWITCHYARD_WASM_THREADS, default 1 (processes are the first way to scale). */
function requestedWasmThreads(): number {
  const raw = process.env.SWITCHYARD_WASM_THREADS;
  if (raw === undefined || raw === '') return 1;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new Error(`SWITCHYARD_WASM_THREADS='${raw}' must be a positive integer`);
  return n;
}

async function tryWasm(threads: number): Promise<{ threads: number; simd: boolean }> {
  const wasm = await import('@tensorflow/tfjs-backend-wasm');
  const restore = threads > 1 ? prepareWasmThreads(threads) : undefined;
  if (threads > 1) wasm.setThreadsCount(threads);
  try {
    const starting = tf.setBackend('wasm');
    if (!(await (threads > 1 ? threadedStart(starting, threads) : starting))) throw new Error('wasm backend refused to initialise');
    await tf.ready();
  } catch (err) {
    // tfjs keeps waiting on an abandoned init, and tf.ready() for the next candidate would wait with it.
    tf.removeBackend('wasm');
    throw err;
  } finally {
    restore?.();
  }
  const simd = (await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT')) as boolean;
  return { threads: wasm.getThreadsCount(), simd };
}

function parseChoice(value: string): BackendChoice {
  if ((BACKEND_CHOICES as readonly string[]).includes(value)) return value as BackendChoice;
  throw new Error(`SWITCHYARD_BACKEND='${value}' is not one of ${BACKEND_CHOICES.join(', ')}`);
}

/**
 * Picks and initialises the compute backend once per process. `forced` (or SWITCHYARD_BACKEND) selects
 * exactly one candidate and fails loudly if it cannot start.
 */
export async function initBackend(forced: string | undefined = process.env.SWITCHYARD_BACKEND): Promise<BackendInfo> {
  if (active) return active;
  const candidates: BackendChoice[] = forced ? [parseChoice(forced)] : [...BACKEND_CHOICES];
  const wasmThreads = requestedWasmThreads();
  const skipped: string[] = [];
  for (const choice of candidates) {
    try {
      let threads = 1;
      let simd = false;
      if (choice === 'tensorflow-gpu') await tryNative('@tensorflow/tfjs-node-gpu');
      else if (choice === 'tensorflow') await tryNative('@tensorflow/tfjs-node');
      else if (choice === 'wasm') ({ threads, simd } = await tryWasm(wasmThreads));
      else {
        await import('@tensorflow/tfjs-backend-cpu');
        if (!(await tf.setBackend('cpu'))) throw new Error('cpu backend refused to initialise');
      }
      if (choice.startsWith('tensorflow')) {
        const os = await import('node:os');
        threads = os.availableParallelism();
      }
      await tf.ready();
      active = { choice, tfjsBackend: tf.getBackend(), threads, simd, skipped };
      return active;
    } catch (err) {
      const reason = err instanceof Error ? err.message.split('\n')[0] : String(err);
      if (forced) throw new Error(`backend '${choice}' forced by SWITCHYARD_BACKEND could not start: ${reason}`);
      skipped.push(`${choice}: ${reason}`);
    }
  }
  throw new Error(`no compute backend could start (${skipped.join('; ')})`);
}

export function backendInfo(): BackendInfo {
  if (!active) throw new Error('initBackend() has not been called');
  return active;
}

export function describeBackend(info: BackendInfo): string {
  const simd = info.choice === 'wasm' ? (info.simd ? ', SIMD' : ', no SIMD') : '';
  return `compute backend: ${info.choice} (tfjs '${info.tfjsBackend}'${simd}, ${info.threads} thread${info.threads === 1 ? '' : 's'})`;
}
