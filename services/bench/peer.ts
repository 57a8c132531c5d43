// peer suite: the same Mixtral forward in PyTorch on CPU (services/bench/peer/mixtral_forward.py, which
// reads the checkpoint itself) on the same checkpoint and input, timed against ours in one process; the
// logits are compared too. Skipped, with the reason in the table, where `python3 -c "import torch"` fails.
import { execFile, execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { preset } from '../core/config.js';
import { Rng } from '../core/data/random.js';
import { MixtralModel } from '../core/model/model.js';
import { saveModel } from '../core/checkpoint/model.js';
import { report, timeMedian, type BenchRow } from './report.js';

/** The script ships in the source tree (tsc does not copy it): from dist/services/bench, three levels up. */
export function peerScriptPath(): string {
  return fileURLToPath(new URL('../../../services/bench/peer/mixtral_forward.py', import.meta.url));
}

/** The interpreter for the reference script: SWITCHYARD_PYTHON (e.g. Debian's /usr/bin/python3 when the
 * python3 on PATH has no NumPy), else python3. */
export const peerPython = (): string => process.env.SWITCHYARD_PYTHON || 'python3';

export interface PeerRun { seconds: number; logits: Float32Array; backend: string; threads: number }

/** Runs the reference script on a checkpoint and ids; `backend` numpy checks the maths without PyTorch. */
export async function runPeer(checkpoint: string, ids: Int32Array, batch: number, tokens: number, reps: number, backend: 'torch' | 'numpy'): Promise<PeerRun> {
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-peer-'));
  try {
    await writeFile(join(dir, 'ids.bin'), new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength));
    const stdout = await new Promise<string>((resolve, reject) => execFile(peerPython(), [
      peerScriptPath(), checkpoint, join(dir, 'ids.bin'), String(batch), String(tokens), join(dir, 'logits.bin'), '--reps', String(reps), '--backend', backend,
    ], { maxBuffer: 1 << 20 }, (err, out, errText) => (err ? reject(new Error(`peer script failed: ${errText || err.message}`)) : resolve(out))));
    const result = JSON.parse(stdout.trim().split('\n').at(-1)!) as { seconds: number; backend: string; threads: number };
    const bytes = await readFile(join(dir, 'logits.bin'));
    return { ...result, logits: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function torchMissing(): string | undefined {
  try {
    execFileSync(peerPython(), ['-c', 'import torch'], { stdio: 'pipe' });
    return undefined;
  } catch (err) {
    return `${peerPython()} -c "import torch" fails: ${String((err as { stderr?: Buffer }).stderr ?? (err as Error).message).trim().split('\n').at(-1)}`;
  }
}

export async function peerSuite(quick: boolean): Promise<void> {
  const missing = torchMissing();
  if (missing) {
    await report('peer', [{ name: 'Mixtral forward vs PyTorch CPU: skipped (no PyTorch here)', value: 0, unit: 'n/a' }], { quick, skipped: missing });
    return;
  }
  const dir = await mkdtemp(join(tmpdir(), 'switchyard-bench-peer-'));
  const { model: config } = preset('small');
  const model = MixtralModel.initialize(config, 4);
  try {
    await saveModel(join(dir, 'small'), model);
    const [batch, tokens] = quick ? [2, 64] : [4, 128];
    const rng = new Rng(8);
    const ids = Int32Array.from({ length: batch * tokens }, () => Math.floor(rng.next() * 256));
    const reps = quick ? 3 : 7;
    let ours: Float32Array = new Float32Array(0);
    const oursSeconds = await timeMedian(reps, async () => { ours = await model.logits(ids, batch, tokens); });
    const peer = await runPeer(join(dir, 'small'), ids, batch, tokens, reps, 'torch');
    let maxDiff = 0;
    for (let i = 0; i < ours.length; i++) maxDiff = Math.max(maxDiff, Math.abs(ours[i] - peer.logits[i]));
    const rows: BenchRow[] = [
      { name: `Mixtral forward (small), ${batch}x${tokens} tokens, Switchyard in one process`, value: (batch * tokens) / oursSeconds, unit: 'tokens/s' },
      { name: `same forward in PyTorch CPU (${peer.threads} threads)`, value: (batch * tokens) / peer.seconds, unit: 'tokens/s' },
      { name: 'Switchyard / PyTorch', value: peer.seconds / oursSeconds, unit: 'ratio', anchor: 1, ratio: peer.seconds / oursSeconds },
      { name: 'max |Δ logit| between the two', value: maxDiff, unit: 'abs' },
    ];
    await report('peer', rows, { quick, batch, tokens, reps });
  } finally {
    model.dispose();
    await rm(dir, { recursive: true, force: true });
  }
}
