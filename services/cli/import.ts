// `switchyard import DIR`: checks a model folder (e.g. downloaded from the Hugging Face hub) from its
// config and safetensors headers, with the same checks every service runs before it serves, and prints
// what serving it takes; or lists everything missing or unsupported and exits 1.
import { resolve } from 'node:path';
import { examineCheckpoint, CheckpointError } from '../core/checkpoint/index.js';
import { summarizeModel, type ByteSize, type ModelSummary } from '../core/checkpoint/summary.js';
import { PUBLISHED_LAYOUT } from '../core/model/hf.js';
import { loadTokenizer, TokenizerError } from '../core/tokenizer/index.js';
import { memoryPlan, selectedBackend, type MemoryPlan } from '../core/checkpoint/memory.js';

export interface ImportFlags { shards: number; json?: boolean; backend?: string }

/** Decimal units, as Hugging Face and GPU memory sizes are quoted. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} ${units[unit]}`;
}

function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

const both = (b: ByteSize) => `${formatBytes(b.stored)} stored, ${formatBytes(b.float32)} as float32`;

/** The memory lines of the summary: what each service holds on the backend, and the router's host copy. */
function formatMemory(m: MemoryPlan): string[] {
  const limit = m.limitBytes !== undefined ? `, at most ${formatBytes(m.limitBytes)} per process` : '';
  return [
    `  memory            on the ${m.backend} backend${limit} (weights as float32 + one step's work):`,
    ...m.services.map((s) => `    ${s.service.padEnd(12)}${formatBytes(s.backendBytes)} (${formatBytes(s.weightBytes)} + ${formatBytes(s.workBytes)})` +
      (s.hostBytes ? `, and ${formatBytes(s.hostBytes)} of host memory (embedding copy; the KV cache comes on top, --kv-cache-tokens)` : '')),
  ];
}

export function formatSummary(s: ModelSummary, memory?: MemoryPlan, ready = true): string {
  const p = s.parameters;
  const lines = [
    `${s.dir}: ${ready ? 'ready to serve' : 'read, but it cannot be served as planned (the problems follow)'}`,
    `  model type        ${s.modelType}`,
    `  layers            ${s.layers}`,
    `  experts           ${s.experts} per layer, k = ${s.expertsPerToken} per token, ${s.renormalize ? 'weights renormalised over the k' : 'softmax weights not renormalised'}${s.routerBias ? ', router bias' : ''}; ${s.expertKind}`,
    `  MoE layers        ${s.denseLayers.length ? `${s.moeLayers.join(', ')}; dense MLP in ${s.denseLayers.map((d) => `${d.layer} (${d.width} wide)`).join(', ')}` : `all ${s.layers}`}`,
    ...(s.sharedExperts ? [`  shared experts    ${s.sharedExperts.width} wide per MoE layer${s.sharedExperts.gated ? ', scaled by sigmoid(shared_expert_gate)' : ''} (held by the router)`] : []),
    `  hidden size       ${s.hiddenSize} (head_dim ${s.headDim})`,
    `  intermediate size ${s.intermediateSize}`,
    `  vocabulary        ${s.vocabSize}${s.tiedEmbeddings ? ' (tied embeddings)' : ''}`,
    `  attention         ${[s.layerWindows ?? (s.slidingWindow === undefined ? 'full causal' : `sliding window ${s.slidingWindow}`), ...s.attentionExtras].join('; ')}`,
    `  parameters        ${formatCount(p.total)} total (${p.total}): ${formatCount(p.perExpert)} per expert (${p.perExpert}), ` +
      `${formatCount(p.allExperts)} in experts, ${formatCount(p.dense)} dense (${p.dense})`,
    `  dtype             torch_dtype ${s.torchDtype}; tensors ${s.dtypes.join(', ')} (converted to float32 for compute)`,
    `  files             ${s.files.length} weight file(s), ${formatBytes(s.files.reduce((a, f) => a + f.bytes, 0))}: ${s.files.map((f) => f.name).join(', ')}`,
    `  dense part        ${both(s.dense)} (each router)`,
    `  expert shards     ${s.shards.length} (spread:i/${s.shards.length}):`,
    ...s.shards.map((sh) => `    spread:${sh.shard}/${s.shards.length}  ${sh.experts} experts, ${both(sh.bytes)}`),
    `  tokenizer         ${s.tokenizer.file ? `${s.tokenizer.file} (${s.tokenizer.ids} ids)` : 'byte vocabulary'}`,
    ...(memory ? formatMemory(memory) : []),
  ];
  return lines.join('\n') + '\n';
}

/** Runs the command; returns the exit code (0 ready, 1 not servable). */
export async function importCommand(dir: string, flags: ImportFlags): Promise<number> {
  const target = resolve(dir);
  let problems: string[];
  let summary: ModelSummary | undefined;
  let memory: MemoryPlan | undefined;
  try {
    const found = await examineCheckpoint(target, PUBLISHED_LAYOUT);
    problems = found.problems;
    if (!problems.length) {
      // Loaded as the router loads it before serving (/v1/completions encodes with it), so a folder
      // whose tokenizer the router would refuse is refused here too.
      const tokenizer = await loadTokenizer(found.dir, found.config!);
      summary = await summarizeModel({ config: found.config!, files: found.files, dir: found.dir, tensors: found.tensors }, flags.shards, tokenizer);
      // What each process will hold on the backend its services would pick; what cannot fit is refused now.
      memory = memoryPlan(found.config!, summary.dense.float32, summary.shards.map((sh) => sh.bytes.float32), selectedBackend(flags.backend));
      problems = memory.problems;
    }
  } catch (err) {
    if (!(err instanceof CheckpointError || err instanceof TokenizerError)) throw err;
    problems = [err.message];
  }
  const ok = summary !== undefined && problems.length === 0;
  if (flags.json) {
    process.stdout.write(JSON.stringify(ok ? { ok: true, ...summary, memory } : { ok: false, dir: target, problems, ...(summary ? { summary, memory } : {}) }, null, 2) + '\n');
  } else if (ok) {
    process.stdout.write(formatSummary(summary!, memory));
  } else {
    if (summary) process.stdout.write(formatSummary(summary, memory, false));
    process.stderr.write(`switchyard import: ${target} cannot be served (${problems.length} problem${problems.length === 1 ? '' : 's'}):\n${problems.map((p) => `  - ${p}`).join('\n')}\n`);
  }
  return ok ? 0 : 1;
}
