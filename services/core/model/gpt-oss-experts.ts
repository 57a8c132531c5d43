// GPT-OSS stores each layer's experts fused, as Hugging Face transformers' GptOssExperts holds them:
//   gate_up_proj [E, D, 2I] ([in, out] per expert; gate and up columns interleaved: gate = even,
//   up = odd), gate_up_proj_bias [E, 2I] (interleaved alike), down_proj [E, I, D], down_proj_bias [E, D];
// or, as published, the two matrices in MXFP4 (…_blocks and …_scales, see checkpoint/mxfp4.ts) next to
// the same biases. This module cuts one expert out of that in Switchyard's compute layout, and fuses
// experts back (unquantized) for saving.
import { CheckpointError, isByteTensor, type ByteTensor, type StoredTensor, type Tensor as HostTensor } from '../checkpoint/safetensors.js';
import { dequantizeMxfp4Expert } from '../checkpoint/mxfp4.js';
import type { HostExpertParams } from './experts.js';

type Projection = 'gate_up_proj' | 'down_proj';

const expertsPrefix = (layer: number) => `model.layers.${layer}.mlp.experts`;

/** Hugging Face names of a GPT-OSS layer's fused expert tensors. */
export const gptOssExpertNames = {
  gateUp: (layer: number) => `${expertsPrefix(layer)}.gate_up_proj`,
  gateUpBias: (layer: number) => `${expertsPrefix(layer)}.gate_up_proj_bias`,
  down: (layer: number) => `${expertsPrefix(layer)}.down_proj`,
  downBias: (layer: number) => `${expertsPrefix(layer)}.down_proj_bias`,
  blocks: (layer: number, proj: Projection) => `${expertsPrefix(layer)}.${proj}_blocks`,
  scales: (layer: number, proj: Projection) => `${expertsPrefix(layer)}.${proj}_scales`,
};

/**
 * The tensors of layer `layer` that gptOssExpertFromHf needs: the MXFP4 form (blocks, scales, biases)
 * or the unquantized one.
 */
export function gptOssExpertTensorNames(layer: number, form: 'mxfp4' | 'unquantized'): string[] {
  const n = gptOssExpertNames;
  const biases = [n.gateUpBias(layer), n.downBias(layer)];
  if (form === 'unquantized') return [n.gateUp(layer), n.down(layer), ...biases];
  return [n.blocks(layer, 'gate_up_proj'), n.scales(layer, 'gate_up_proj'), n.blocks(layer, 'down_proj'), n.scales(layer, 'down_proj'), ...biases];
}

/** The `byteTensors` selector for GPT-OSS checkpoints: the MXFP4 blocks and scales, stored as U8. */
export const isGptOssByteTensor = (name: string): boolean => /\.mlp\.experts\.(gate_up|down)_proj_(blocks|scales)$/.test(name);

/** One GPT-OSS expert in compute layout: w1t (gate), w3t (up) [D, I], w2t [I, D]; b1, b3 [I], b2 [D]. */
export type GptOssHostExpert = Required<HostExpertParams>;

function stored(tensors: ReadonlyMap<string, StoredTensor>, name: string): StoredTensor {
  const t = tensors.get(name);
  if (!t) throw new CheckpointError(`tensor ${name} missing`);
  return t;
}

function floats(tensors: ReadonlyMap<string, StoredTensor>, name: string, rank: number): HostTensor {
  const t = stored(tensors, name);
  if (isByteTensor(t)) throw new CheckpointError(`tensor ${name} is stored as bytes, expected floats`);
  if (t.shape.length !== rank) throw new CheckpointError(`tensor ${name} has shape [${t.shape.join(', ')}], expected ${rank} axes`);
  return t;
}

function bytes(tensors: ReadonlyMap<string, StoredTensor>, name: string): ByteTensor {
  const t = stored(tensors, name);
  if (!isByteTensor(t)) throw new CheckpointError(`tensor ${name} holds floats, expected MXFP4 bytes (read it with byteTensors: isGptOssByteTensor)`);
  return t;
}

/** Entry `expert` of a tensor's leading axis, copied (the fused layer tensor need not stay alive). */
function entry(t: HostTensor, expert: number, name: string): HostTensor {
  const [count, ...rest] = t.shape;
  if (expert < 0 || expert >= count!) throw new RangeError(`expert ${expert} is not in ${name}, which holds ${count}`);
  const size = rest.reduce((a, b) => a * b, 1);
  return { shape: rest, values: t.values.slice(expert * size, (expert + 1) * size) };
}

/** Expert `expert`'s [in, out] matrix of a fused projection: dequantized when the layer is in MXFP4. */
function projection(tensors: ReadonlyMap<string, StoredTensor>, layer: number, proj: Projection, expert: number): HostTensor {
  const blocks = gptOssExpertNames.blocks(layer, proj);
  if (tensors.has(blocks)) return dequantizeMxfp4Expert(bytes(tensors, blocks), bytes(tensors, gptOssExpertNames.scales(layer, proj)), expert);
  const name = proj === 'gate_up_proj' ? gptOssExpertNames.gateUp(layer) : gptOssExpertNames.down(layer);
  return entry(floats(tensors, name, 3), expert, name);
}

/** Columns [start, start + 2, …] of a row-major [rows, cols] matrix: one half of an interleaved pair. */
function everyOtherColumn(values: Float32Array, rows: number, cols: number, start: 0 | 1): Float32Array {
  const half = cols / 2;
  const out = new Float32Array(rows * half);
  for (let r = 0; r < rows; r++) for (let i = 0; i < half; i++) out[r * half + i] = values[r * cols + 2 * i + start]!;
  return out;
}

/**
 * One expert of a GPT-OSS layer from the layer's Hugging Face tensors, either form (MXFP4 blocks and
 * scales as ByteTensors, or unquantized floats), in Switchyard's compute layout.
 */
export function gptOssExpertFromHf(tensors: ReadonlyMap<string, StoredTensor>, layer: number, expert: number): GptOssHostExpert {
  const gateUp = projection(tensors, layer, 'gate_up_proj', expert);
  const down = projection(tensors, layer, 'down_proj', expert);
  const [D, I2] = gateUp.shape as [number, number];
  const I = I2 / 2;
  const where = `GPT-OSS layer ${layer} experts`;
  if (!Number.isInteger(I)) throw new CheckpointError(`${where}: gate_up_proj has ${I2} columns, not gate and up pairs`);
  if (down.shape[0] !== I || down.shape[1] !== D)
    throw new CheckpointError(`${where}: down_proj is [${down.shape.join(', ')}] per expert, expected [${I}, ${D}] to match gate_up_proj [${D}, ${I2}]`);
  const gateUpBias = entry(floats(tensors, gptOssExpertNames.gateUpBias(layer), 2), expert, gptOssExpertNames.gateUpBias(layer));
  const downBias = entry(floats(tensors, gptOssExpertNames.downBias(layer), 2), expert, gptOssExpertNames.downBias(layer));
  if (gateUpBias.values.length !== I2) throw new CheckpointError(`${where}: gate_up_proj_bias has ${gateUpBias.values.length} values per expert, expected ${I2}`);
  if (downBias.values.length !== D) throw new CheckpointError(`${where}: down_proj_bias has ${downBias.values.length} values per expert, expected ${D}`);
  return {
    w1t: { shape: [D, I], values: everyOtherColumn(gateUp.values, D, I2, 0) },
    w3t: { shape: [D, I], values: everyOtherColumn(gateUp.values, D, I2, 1) },
    w2t: down,
    b1: { shape: [I], values: everyOtherColumn(gateUpBias.values, 1, I2, 0) },
    b3: { shape: [I], values: everyOtherColumn(gateUpBias.values, 1, I2, 1) },
    b2: downBias,
  };
}

/**
 * The inverse for saving: every expert of `layer`, in expert order, fused into the unquantized
 * Hugging Face tensors (gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias), set into `out`.
 */
export function gptOssExpertsToHf(out: Map<string, HostTensor>, layer: number, experts: readonly GptOssHostExpert[]): void {
  const E = experts.length;
  if (E === 0) throw new RangeError(`GPT-OSS layer ${layer}: no experts to save`);
  const [D, I] = experts[0]!.w1t.shape as [number, number];
  const gateUp = new Float32Array(E * D * 2 * I);
  const gateUpBias = new Float32Array(E * 2 * I);
  const down = new Float32Array(E * I * D);
  const downBias = new Float32Array(E * D);
  experts.forEach((w, e) => {
    const sizes: Array<[HostTensor, number]> = [[w.w1t, D * I], [w.w3t, D * I], [w.w2t, I * D], [w.b1, I], [w.b3, I], [w.b2, D]];
    if (sizes.some(([t, n]) => t.values.length !== n))
      throw new RangeError(`GPT-OSS layer ${layer} expert ${e}: weights do not match expert 0's hidden ${D} and intermediate ${I}`);
    for (let d = 0; d < D; d++)
      for (let i = 0; i < I; i++) {
        const at = (e * D + d) * 2 * I + 2 * i;
        gateUp[at] = w.w1t.values[d * I + i]!;
        gateUp[at + 1] = w.w3t.values[d * I + i]!;
      }
    for (let i = 0; i < I; i++) {
      gateUpBias[e * 2 * I + 2 * i] = w.b1.values[i]!;
      gateUpBias[e * 2 * I + 2 * i + 1] = w.b3.values[i]!;
    }
    down.set(w.w2t.values, e * I * D);
    downBias.set(w.b2.values, e * D);
  });
  const n = gptOssExpertNames;
  out.set(n.gateUp(layer), { shape: [E, D, 2 * I], values: gateUp });
  out.set(n.gateUpBias(layer), { shape: [E, 2 * I], values: gateUpBias });
  out.set(n.down(layer), { shape: [E, I, D], values: down });
  out.set(n.downBias(layer), { shape: [E, D], values: downBias });
}
