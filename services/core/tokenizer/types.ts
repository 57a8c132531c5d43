// The one text ↔ token-id interface every service uses; implementations live beside this file.

/** Options of `TextTokenizer.encode`. */
export interface EncodeOptions {
  /**
   * Add the special tokens the tokenizer puts around a text (BOS; a tokenizer.json post-processor's
   * template). Default true. False is `add_special_tokens=False` of Hugging Face, as `apply_chat_template`
   * tokenizes a rendered chat whose template already wrote BOS. Either way special tokens written in the
   * text (`<s>`, `<|im_start|>`) become their ids.
   */
  addSpecialTokens?: boolean;
}

/**
 * The named special tokens of tokenizer_config.json as strings (an AddedToken object gives its `content`),
 * as transformers' `special_tokens_map`: only the ones the file sets. A chat template sees them as variables.
 */
export interface SpecialTokens {
  bos_token?: string;
  eos_token?: string;
  unk_token?: string;
  sep_token?: string;
  pad_token?: string;
  cls_token?: string;
  mask_token?: string;
  additional_special_tokens?: string[];
}

export interface TextTokenizer {
  /** What the ids mean, for logs and errors: 'byte vocabulary' or the tokenizer.json path. */
  readonly source: string;
  /** Ids the tokenizer can produce or read: 0 .. vocabSize-1 (at most the model's vocab_size). */
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** Ids that end a generation (the tokenizer's EOS and the model config's eos_token_id). */
  readonly stopIds: readonly number[];
  /** Text to ids, with BOS in front when the model expects it (unless `addSpecialTokens` is false). */
  encode(text: string, options?: EncodeOptions): Int32Array;
  /** Ids to text, special tokens skipped; unknown ids are dropped. */
  decode(ids: ArrayLike<number>): string;
  /**
   * How many characters at the end of a decoded text the ids after it can still rewrite (0: decoding more
   * ids only appends). clean_up_tokenization_spaces turns " n" + "'t" into "n't": 4.
   */
  readonly rewritableChars: number;
  /** tokenizer_config.json's special tokens (absent or empty: the file has none, or there is no file). */
  readonly specialTokens?: Readonly<SpecialTokens>;
  /**
   * tokenizer_config.json's `chat_template`: one template, or several by name (the file's list of
   * `{name, template}`). Absent when the file has none. chat-template.ts decides which template is used.
   */
  readonly chatTemplate?: string | Readonly<Record<string, string>>;
  /** A special token's own text ('<s>', '<|im_end|>'), which decode() skips; undefined for other ids. */
  specialText?(id: number): string | undefined;
  /** The bytes an id stands for when it is a byte token (byte vocabulary, `<0xXX>` byte fallback), else undefined. */
  rawBytes?(id: number): number[] | undefined;
}

/** A tokenizer file that is missing, unreadable or does not fit the model. */
export class TokenizerError extends Error {
  override name = 'TokenizerError';
}
