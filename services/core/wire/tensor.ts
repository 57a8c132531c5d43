// Tensors on the wire (DESIGN §6): raw little-endian bytes with dtype and shape. Encoding F32 shares the
// rows' memory; decoding F32 is a view when grpc-js hands over 4-byte-aligned bytes, else one copy.
// Anything malformed is a WireError, which services answer with INVALID_ARGUMENT.
import { status } from '@grpc/grpc-js';
import { BYTES_PER_ELEMENT, decodeFloats, encodeFloats, type FloatDtype } from '../dtypes.js';
import type { Tensor } from '../../generated/switchyard/v1/Tensor.js';
import type { Tensor__Output } from '../../generated/switchyard/v1/Tensor.js';

export class WireError extends Error {
  override name = 'WireError';
  readonly code = status.INVALID_ARGUMENT;
}

const TO_WIRE = { F32: 'DTYPE_F32', BF16: 'DTYPE_BF16', F16: 'DTYPE_F16' } as const;
const FROM_WIRE: Record<string, FloatDtype> = { DTYPE_F32: 'F32', DTYPE_BF16: 'BF16', DTYPE_F16: 'F16' };

/** A float32 tensor as a wire message; BF16/F16 halve the bytes at reduced precision. */
export function toWireTensor(values: Float32Array, shape: readonly number[], dtype: FloatDtype = 'F32'): Tensor {
  const count = shape.reduce((a, b) => a * b, 1);
  if (count !== values.length) throw new WireError(`tensor of shape [${shape.join(', ')}] needs ${count} values, got ${values.length}`);
  const bytes = encodeFloats(values, dtype);
  return { dtype: TO_WIRE[dtype], shape: [...shape], data: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
}

export interface DecodedTensor {
  values: Float32Array;
  shape: number[];
  dtype: FloatDtype;
}

/**
 * Checks and decodes a received tensor. `expectShape` entries that are not null must match (e.g.
 * [null, hidden] for row batches).
 */
export function fromWireTensor(t: Tensor__Output | null | undefined, what: string, expectShape?: ReadonlyArray<number | null>): DecodedTensor {
  if (!t) throw new WireError(`${what}: tensor missing`);
  const dtype = FROM_WIRE[t.dtype];
  if (!dtype) throw new WireError(`${what}: unsupported dtype ${t.dtype}`);
  const shape = [...t.shape];
  if (expectShape) {
    const ok = shape.length === expectShape.length && expectShape.every((d, i) => d === null || d === shape[i]);
    if (!ok) throw new WireError(`${what}: shape [${shape.join(', ')}] does not match [${expectShape.map((d) => d ?? '*').join(', ')}]`);
  }
  const count = shape.reduce((a, b) => a * b, 1);
  const expectedBytes = count * BYTES_PER_ELEMENT[dtype];
  if (t.data.byteLength !== expectedBytes)
    throw new WireError(`${what}: ${t.data.byteLength} data bytes for ${dtype} [${shape.join(', ')}], expected ${expectedBytes}`);
  return { values: decodeFloats(dtype, t.data, count), shape, dtype };
}
