// The one text ↔ token-id interface every service uses; implementations live beside this file.

export interface TextTokenizer {
  /** What the ids mean, for logs and errors: 'byte vocabulary' or the tokenizer.json path. */
  readonly source: string;
  /** Ids the tokenizer can produce or read: 0 .. vocabSize-1 (at most the model's vocab_size). */
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** Ids that end a generation (the tokenizer's EOS and the model config's eos_token_id). */
  readonly stopIds: readonly number[];
  /** Text to ids, with BOS in front when the model expects it. */
  encode(text: string): Int32Array;
  /** Ids to text, special tokens skipped; unknown ids are dropped. */
  decode(ids: ArrayLike<number>): string;
  /**
   * How many characters at the end of a decoded text the ids after it can still rewrite (0: decoding more
   * ids only appends). clean_up_tokenization_spaces turns " n" + "'t" into "n't": 4.
   */
  readonly rewritableChars: number;
}

/** A tokenizer file that is missing, unreadable or does not fit the model. */
export class TokenizerError extends Error {
  override name = 'TokenizerError';
}
