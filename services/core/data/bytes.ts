// The byte-level vocabulary of models trained here: ids 0..255 are UTF-8 bytes; specials follow.
import { BOS_ID, EOS_ID } from '../config.js';

export function encodeText(text: string): Int32Array {
  return Int32Array.from(new TextEncoder().encode(text));
}

/** Bytes back to text; special ids are dropped and broken UTF-8 becomes U+FFFD. */
export function decodeIds(ids: ArrayLike<number>): string {
  const bytes: number[] = [];
  for (let i = 0; i < ids.length; i++) if (ids[i] >= 0 && ids[i] < 256) bytes.push(ids[i]);
  return new TextDecoder('utf-8').decode(Uint8Array.from(bytes));
}

export const isSpecial = (id: number): boolean => id === BOS_ID || id === EOS_ID || id >= 256;
