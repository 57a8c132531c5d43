// The loader behind SWITCHYARD_WASM_THREADS: one worker script per process, written once, and a start that
// cannot end in a silent exit. (The threaded run itself is tested in cli.test.ts, in a child process.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import '@tensorflow/tfjs-backend-wasm'; // registers the flags the loader sets
import { prepareWasmThreads, threadedStart } from '../services/core/wasm-threads.js';

test('every pthread worker gets the same script file, written once, as CommonJS', async () => {
  const restore = prepareWasmThreads(2);
  try {
    const workerText = 'postMessage("hello from the worker");';
    const first = URL.createObjectURL(new Blob([workerText], { type: 'application/javascript' }));
    const written = statSync(first).mtimeMs;
    await sleep(30);
    const again = URL.createObjectURL(new Blob([workerText], { type: 'application/javascript' }));
    assert.equal(again, first);
    // Workers started earlier may be reading it right now: the second request must not touch the file.
    assert.equal(statSync(again).mtimeMs, written);
    assert.match(first, /\.cjs$/);
    const script = readFileSync(first, 'utf8');
    assert.ok(script.endsWith(workerText));
    assert.match(script, /^URL\.createObjectURL=\(\)=>".*tfjs-backend-wasm-threaded-simd\.js";/);
  } finally {
    restore();
  }
});

test('a threaded start that never settles fails with a message instead of letting the process end', async () => {
  await assert.rejects(threadedStart(new Promise<never>(() => {}), 2, 50), /wasm with 2 threads did not start within 0.05 s/);
  assert.equal(await threadedStart(Promise.resolve(true), 2, 50), true);
});
