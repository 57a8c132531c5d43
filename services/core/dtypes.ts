// Little-endian tensor bytes ↔ Float32Array for the dtypes Switchyard reads and writes: the one place
// for these conversions, used by checkpoints (safetensors) and the wire codec. F32 is decoded as a view,
// without copying, whenever the bytes are 4-byte aligned.
import { endianness } from 'node:os';

export const LITTLE_ENDIAN = endianness() === 'LE';

/** safetensors' dtype names; the wire uses the same set. */
export type FloatDtype = 'F32' | 'BF16' | 'F16';
export type ReadableDtype = FloatDtype | 'F64' | 'I32' | 'I64';

export const BYTES_PER_ELEMENT: Record<ReadableDtype, number> = { F32: 4, BF16: 2, F16: 2, F64: 8, I32: 4, I64: 8 };
export const READABLE_DTYPES = Object.keys(BYTES_PER_ELEMENT) as readonly ReadableDtype[];
/** The readable dtypes that hold real numbers: what model weights may be stored as. */
export const FLOAT_WEIGHT_DTYPES: readonly ReadableDtype[] = ['F32', 'BF16', 'F16', 'F64'];

/** IEEE half → float. */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** float → bfloat16 bits, round to nearest even, NaN kept NaN. */
export function f32ToBf16(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0]!;
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x40) & 0xffff; // quiet NaN
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** float → IEEE half bits, round to nearest even; overflow → ±Inf, NaN kept NaN. */
export function f32ToF16(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    // Subnormal half: shift the implicit-one mantissa, rounding to nearest even.
    const m = mant | 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = m & ((1 << shift) - 1);
    let r = m >>> shift;
    if (rest > half || (rest === half && (r & 1))) r++;
    return sign | r;
  }
  let r = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (r & 1))) r++;
  return sign | r;
}

/** `count` elements of `dtype` from little-endian bytes, as float32. */
export function decodeFloats(dtype: ReadableDtype, bytes: Uint8Array, count: number): Float32Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case 'F32': {
      if (LITTLE_ENDIAN && bytes.byteOffset % 4 === 0) return new Float32Array(bytes.buffer, bytes.byteOffset, count);
      const out = new Float32Array(count);
      if (LITTLE_ENDIAN) new Uint8Array(out.buffer).set(bytes.subarray(0, count * 4));
      else for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
      return out;
    }
    case 'BF16': {
      const out = new Float32Array(count);
      const u = new Uint32Array(out.buffer);
      for (let i = 0; i < count; i++) u[i] = view.getUint16(2 * i, true) << 16;
      return out;
    }
    case 'F16': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = f16ToF32(view.getUint16(2 * i, true));
      return out;
    }
    case 'F64': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(8 * i, true);
      return out;
    }
    case 'I32': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt32(4 * i, true);
      return out;
    }
    case 'I64': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = Number(view.getBigInt64(8 * i, true));
      return out;
    }
    default:
      throw new Error(`unsupported dtype ${String(dtype)}`);
  }
}

/** float32 values as little-endian bytes of `dtype`; F32 is a view of the same memory (no copy). */
export function encodeFloats(values: Float32Array, dtype: FloatDtype): Uint8Array {
  if (dtype === 'F32') {
    if (LITTLE_ENDIAN) return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
    const out = new Uint8Array(values.length * 4);
    const v = new DataView(out.buffer);
    for (let i = 0; i < values.length; i++) v.setFloat32(4 * i, values[i]!, true);
    return out;
  }
  const out = new Uint8Array(values.length * 2);
  const v = new DataView(out.buffer);
  const convert = dtype === 'BF16' ? f32ToBf16 : f32ToF16;
  for (let i = 0; i < values.length; i++) v.setUint16(2 * i, convert(values[i]!), true);
  return out;
}
