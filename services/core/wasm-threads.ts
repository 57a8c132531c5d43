// Opt-in multi-threaded wasm (SWITCHYARD_WASM_THREADS=N > 1). tfjs-backend-wasm 4.22 refuses threads under
// Node: its feature flag answers false there, and it hands Emscripten `blob:` URLs for the pthread worker
// and main script, which worker_threads cannot load. Emscripten's own glue does support Node workers, so
// this loader (1) turns the flag on, (2) turns those two blobs into files, and (3) lets XNNPACK see enough
// CPUs (tfjs caps its pool at half the logical cores). It leans on package internals, hence the exact
// version pin in package.json and the default of one thread; processes remain the first way to scale.
import * as tf from '@tensorflow/tfjs-core';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { join } from 'node:path';
import { tmpdir } from 'node:os';

const require = createRequire(import.meta.url);

/** Patches what tfjs's wasm init needs; returns the function that undoes the patches. */
export function prepareWasmThreads(threads: number): () => void {
  const mainScript = require.resolve('@tensorflow/tfjs-backend-wasm/wasm-out/tfjs-backend-wasm-threaded-simd.js');
  const dir = mkdtempSync(join(tmpdir(), 'switchyard-wasm-'));
  const NativeBlob = globalThis.Blob;
  const nativeCreateObjectURL = URL.createObjectURL;
  const nativeCpus = os.cpus;
  const blobTexts = new WeakMap<Blob, string>();

  class RecordingBlob extends NativeBlob {
    constructor(parts?: BlobPart[], options?: BlobPropertyBag) {
      super(parts, options);
      if (parts?.every((p) => typeof p === 'string')) blobTexts.set(this, parts.join(''));
    }
  }
  globalThis.Blob = RecordingBlob;
  // Emscripten asks for the worker URL once per pthread worker, synchronously, while the workers it already
  // started read their script on their own threads: the file is written once (atomically) and never again,
  // since a worker that reads it mid-rewrite finds an empty script, exits silently, and init never ends.
  const workerFiles = new Map<string, string>();
  URL.createObjectURL = (blob: Blob): string => {
    const text = blobTexts.get(blob);
    if (text === undefined) return nativeCreateObjectURL(blob);
    // The only text blob turned into a URL is the pthread worker; inside it, the main-script blob it is
    // sent is replaced by the package's own copy of that script.
    let worker = workerFiles.get(text);
    if (worker === undefined) {
      worker = join(dir, `pthread-worker-${workerFiles.size}.cjs`);
      writeFileSync(`${worker}.tmp`, `URL.createObjectURL=()=>${JSON.stringify(mainScript)};URL.revokeObjectURL=()=>{};\n${text}`);
      renameSync(`${worker}.tmp`, worker);
      workerFiles.set(text, worker);
    }
    return worker;
  };
  const real = nativeCpus();
  os.cpus = () => Array.from({ length: Math.max(real.length, 2 * threads) }, (_, i) => real[i % real.length]);
  tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', true);

  // Emscripten may start more workers later (its pool grows on demand), so the file lives until exit.
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  return () => {
    globalThis.Blob = NativeBlob;
    URL.createObjectURL = nativeCreateObjectURL;
    os.cpus = nativeCpus;
  };
}

const THREADED_START_MS = 60_000;

/**
 * Bounds the threaded start. Emscripten's workers stop holding the event loop once loaded, so a worker that
 * dies before loading leaves init waiting on nothing and Node would exit 0 in silence; this timer holds
 * the loop and turns that into an error.
 */
export function threadedStart<T>(starting: Promise<T>, threads: number, withinMs = THREADED_START_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(
      `wasm with ${threads} threads did not start within ${withinMs / 1000} s (a pthread worker ended before loading)`)), withinMs);
  });
  return Promise.race([starting, deadline]).finally(() => clearTimeout(timer));
}
