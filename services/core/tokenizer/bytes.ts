// The byte vocabulary of models trained here (data/bytes.ts) behind the tokenizer interface.
import { BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, type ModelConfig } from '../config.js';
import { decodeIds, encodeText } from '../data/bytes.js';
import type { TextTokenizer } from './types.js';

export function byteTokenizer(config?: Pick<ModelConfig, 'eos_token_id'>): TextTokenizer {
  const eosId = config?.eos_token_id ?? EOS_ID;
  return {
    source: 'byte vocabulary',
    vocabSize: BYTE_VOCAB_SIZE,
    bosId: BOS_ID,
    eosId,
    stopIds: [eosId],
    // No BOS (so `addSpecialTokens` changes nothing): the models trained here learn from raw byte windows
    // that never contain it. The vocabulary has no text for its special ids: `<|im_end|>` is 10 bytes.
    encode: (text) => encodeText(text),
    decode: decodeIds,
    rewritableChars: 0,
    specialTokens: {},
    specialText: (id) => (id === BOS_ID ? '<s>' : id === eosId ? '</s>' : id >= 256 && id < BYTE_VOCAB_SIZE ? `<special_${id}>` : undefined),
    rawBytes: (id) => (id >= 0 && id < 256 ? [id] : undefined),
  };
}
