// MXFP4, the microscaling 4-bit format GPT-OSS checkpoints store their expert matrices in. Per expert
// a matrix is kept as [rows, in] with `in` cut into groups of 32 values: one U8 scale per group (the
// exponent of a power of two, bias 127) and 16 bytes of two e2m1 codes each, the low nibble holding
// the even element. The dequantized result is laid out as Hugging Face transformers gives it after
// dequantizing (integrations/mxfp4.py): each expert's matrix transposed to [in, rows], so
// gate_up_proj_blocks [E, 2I, D/32, 16] becomes gate_up_proj [E, D, 2I] and down_proj_blocks
// [E, D, I/32, 16] becomes down_proj [E, I, D].
import { CheckpointError, numElements, type ByteTensor, type Tensor } from './safetensors.js';

/** e2m1 code → value: bit 3 the sign, bits 2..1 the exponent, bit 0 the mantissa. */
export const FP4_E2M1_VALUES: Readonly<Float32Array> = Float32Array.of(0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6);

/** Exponent bias of the U8 (E8M0) scales: byte s scales by 2^(s − 127). */
export const MXFP4_SCALE_BIAS = 127;

/**
 * The float32 factor of each scale byte, as computed in float32: byte 255 (E8M0's NaN) overflows to
 * Infinity, so its group comes out non-finite, as it does in transformers.
 */
const SCALE_FACTORS = Float32Array.from({ length: 256 }, (_, s) => 2 ** (s - MXFP4_SCALE_BIAS));

interface Mxfp4Shape { experts: number; rows: number; groups: number; bytesPerGroup: number }

function shapeOf(blocks: ByteTensor, scales: ByteTensor): Mxfp4Shape {
  const [experts, rows, groups, bytesPerGroup] = blocks.shape;
  const fail = (why: string): never => {
    throw new CheckpointError(`MXFP4 blocks [${blocks.shape.join(', ')}] and scales [${scales.shape.join(', ')}]: ${why}`);
  };
  if (blocks.shape.length !== 4) fail('blocks must be [experts, rows, groups, bytes per group]');
  if (scales.shape.length !== 3 || scales.shape.some((n, i) => n !== blocks.shape[i])) fail('scales must be [experts, rows, groups], the blocks without their last axis');
  if (blocks.bytes.length !== numElements(blocks.shape) || scales.bytes.length !== numElements(scales.shape)) fail('byte counts do not match the shapes');
  return { experts: experts!, rows: rows!, groups: groups!, bytesPerGroup: bytesPerGroup! };
}

/** Dequantizes expert `e` into `out` at `offset` as [in, rows] (in = groups · 2 · bytesPerGroup). */
function dequantizeInto(blocks: Uint8Array, scales: Uint8Array, s: Mxfp4Shape, e: number, out: Float32Array, offset: number): void {
  const { rows, groups, bytesPerGroup } = s;
  for (let r = 0; r < rows; r++) {
    const row = e * rows + r;
    for (let g = 0; g < groups; g++) {
      const factor = SCALE_FACTORS[scales[row * groups + g]!]!;
      const base = (row * groups + g) * bytesPerGroup;
      // Element k of this row is input feature k: written at out[k·rows + r], the transposed place.
      let k = g * bytesPerGroup * 2;
      for (let j = 0; j < bytesPerGroup; j++, k += 2) {
        const byte = blocks[base + j]!;
        out[offset + k * rows + r] = FP4_E2M1_VALUES[byte & 0x0f]! * factor;
        out[offset + (k + 1) * rows + r] = FP4_E2M1_VALUES[byte >> 4]! * factor;
      }
    }
  }
}

/**
 * All experts: blocks [E, R, G, B] and scales [E, R, G] → float32 [E, G·2B, R], the layout of
 * transformers' dequantized gate_up_proj / down_proj.
 */
export function dequantizeMxfp4(blocks: ByteTensor, scales: ByteTensor): Tensor {
  const s = shapeOf(blocks, scales);
  const perExpert = s.rows * s.groups * s.bytesPerGroup * 2;
  const values = new Float32Array(s.experts * perExpert);
  for (let e = 0; e < s.experts; e++) dequantizeInto(blocks.bytes, scales.bytes, s, e, values, e * perExpert);
  return { shape: [s.experts, s.groups * s.bytesPerGroup * 2, s.rows], values };
}

/**
 * One expert's slice of dequantizeMxfp4, [G·2B, R], without dequantizing the others (a shard loads a
 * few experts of a layer whose fused tensor holds them all).
 */
export function dequantizeMxfp4Expert(blocks: ByteTensor, scales: ByteTensor, expert: number): Tensor {
  const s = shapeOf(blocks, scales);
  if (!Number.isInteger(expert) || expert < 0 || expert >= s.experts) throw new RangeError(`expert ${expert} is not in MXFP4 tensors of ${s.experts} experts`);
  const values = new Float32Array(s.rows * s.groups * s.bytesPerGroup * 2);
  dequantizeInto(blocks.bytes, scales.bytes, s, expert, values, 0);
  return { shape: [s.groups * s.bytesPerGroup * 2, s.rows], values };
}
