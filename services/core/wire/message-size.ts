// How big an ExpertRequest (and its ExpertReply) can get, bounded from above without encoding it, and
// how the row batches for one shard are packed into messages under a size limit (`--max-message-bytes`).
// The bounds count every protobuf field at its largest varint size, so a planned message never encodes
// larger than estimated (test/wire-split.test.ts encodes planned messages to check).
import { BYTES_PER_ELEMENT, type FloatDtype } from '../dtypes.js';
import { ConfigError } from '../config.js';
import { MAX_MESSAGE_BYTES } from './protos.js';

/**
 * A row batch beyond its row bytes, in the request or its reply, whichever is larger: the batch's own
 * field header, layer, expert, the tensor header, dtype, shape and data header (≈ 44 bytes), and in the
 * reply the credit return of the batch (≈ 20 bytes) — or, in an error reply, the expert it names.
 */
export const BATCH_OVERHEAD_BYTES = 96;

/** A message beyond its batches, pass id and request ids: message id, kind, training tag, gRPC framing. */
export const MESSAGE_OVERHEAD_BYTES = 64;

/**
 * Pass id bytes the smallest allowed limit leaves room for. Pass ids are short (`g1/r0/s12/L3`,
 * `serve-42/L1/reroute`); a split training message adds `/part<k>` (PART_SUFFIX_BYTES).
 */
export const PASS_ID_RESERVE_BYTES = 256;
export const PART_SUFFIX_BYTES = 16;

/** A string field: tag, length varint (≤ 5 bytes), UTF-8 bytes. */
export const stringFieldBytes = (s: string): number => 6 + Buffer.byteLength(s, 'utf8');

export const rowBytes = (hidden: number, dtype: FloatDtype): number => hidden * BYTES_PER_ELEMENT[dtype];

/** The smallest message-size limit that carries one row of `hidden` floats in `dtype`. */
export const minMessageBytes = (hidden: number, dtype: FloatDtype): number =>
  MESSAGE_OVERHEAD_BYTES + PASS_ID_RESERVE_BYTES + PART_SUFFIX_BYTES + BATCH_OVERHEAD_BYTES + rowBytes(hidden, dtype);

/**
 * Checks a configured message-size limit for a model of `hidden` floats per row sent as `dtype` (a shard
 * checks F32: it answers in whatever dtype the router sends). Throws a ConfigError naming `what`.
 */
export function checkMaxMessageBytes(value: number, hidden: number, dtype: FloatDtype, what = 'maxMessageBytes'): number {
  if (!Number.isSafeInteger(value) || value <= 0) throw new ConfigError(`${what} ${value}: expected a positive whole number of bytes`);
  const min = minMessageBytes(hidden, dtype);
  if (value < min)
    throw new ConfigError(`${what} ${value}: a message must hold at least one row of this model (hidden ${hidden} × ${BYTES_PER_ELEMENT[dtype]} bytes ${dtype} = ${rowBytes(hidden, dtype)}) plus ${min - rowBytes(hidden, dtype)} bytes of framing: use at least ${min}`);
  // grpc-js keeps limits as 32-bit integers (−1 = unlimited).
  if (value > 2 ** 31 - 1) throw new ConfigError(`${what} ${value}: at most ${2 ** 31 - 1} (gRPC's limit); the default is ${MAX_MESSAGE_BYTES}`);
  return value;
}

/** Request ids carried in every message: those that fit in half the room one row leaves (they are only for logs). */
export function fittingRequestIds(requestIds: readonly string[], maxMessageBytes: number, passId: string, bytesPerRow: number): string[] {
  let room = Math.floor((maxMessageBytes - MESSAGE_OVERHEAD_BYTES - stringFieldBytes(passId) - PART_SUFFIX_BYTES - BATCH_OVERHEAD_BYTES - bytesPerRow) / 2);
  const kept: string[] = [];
  for (const id of requestIds) {
    room -= stringFieldBytes(id);
    if (room < 0) break;
    kept.push(id);
  }
  return kept;
}

/** Bytes a message may give its batches, once its pass id (with a part suffix) and request ids are counted. */
export function batchCapacity(maxMessageBytes: number, passId: string, requestIds: readonly string[]): number {
  return maxMessageBytes - MESSAGE_OVERHEAD_BYTES - stringFieldBytes(passId) - PART_SUFFIX_BYTES - requestIds.reduce((n, id) => n + stringFieldBytes(id), 0);
}

/** Rows [rowOffset, rowOffset + rowCount) of piece `piece`. */
export interface PlannedChunk { piece: number; rowOffset: number; rowCount: number }

/**
 * Packs pieces of `pieceRows[i]` rows into as few messages as fit `capacity` bytes of batches each: in
 * order, filling each message, so a piece is cut into row ranges where a message fills up (a piece larger
 * than a message spans several). A piece of no rows still gets its (empty) batch. Throws a RangeError when
 * one row does not fit.
 */
export function planMessages(pieceRows: readonly number[], bytesPerRow: number, capacity: number): PlannedChunk[][] {
  if (capacity < BATCH_OVERHEAD_BYTES + bytesPerRow)
    throw new RangeError(`a message of ${capacity} bytes for row batches cannot carry one row of ${bytesPerRow} bytes`);
  const messages: PlannedChunk[][] = [];
  let current: PlannedChunk[] = [];
  let used = 0;
  pieceRows.forEach((rows, piece) => {
    let offset = 0;
    for (;;) {
      const room = capacity - used - BATCH_OVERHEAD_BYTES;
      const fit = room < 0 ? -1 : Math.floor(room / bytesPerRow);
      if (fit < Math.min(rows - offset, 1)) {
        // Full: the next message (the capacity check above makes an empty one take at least one row).
        messages.push(current);
        current = [];
        used = 0;
        continue;
      }
      const take = Math.min(rows - offset, fit);
      current.push({ piece, rowOffset: offset, rowCount: take });
      used += BATCH_OVERHEAD_BYTES + take * bytesPerRow;
      offset += take;
      if (offset >= rows) break;
    }
  });
  if (current.length) messages.push(current);
  return messages;
}
