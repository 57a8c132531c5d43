// Log-probabilities in the two shapes OpenAI answers with: the legacy completions object (tokens,
// token_logprobs, top_logprobs, text_offset) and chat's `content` list (token, logprob, bytes,
// top_logprobs). The numbers come from core/logprobs.ts; this module only names tokens and shapes lists.
import type { TokenLogprob } from '../core/logprobs.js';
import type { TextTokenizer } from '../core/tokenizer/index.js';

/** A token's text as a logprob entry shows it, and its bytes. */
export class TokenTexts {
  private readonly cache = new Map<number, { text: string; bytes: number[] | null }>();
  private readonly anchor: number[] = [];
  private readonly anchorText: string = '';

  constructor(private readonly tokenizer: TextTokenizer | undefined) {
    if (!tokenizer) return;
    // A token's text is what it adds after a plain character: decoded alone, a SentencePiece token would
    // lose its leading space ("▁world" → "world") where it is " world" in running text.
    this.anchor = Array.from(tokenizer.encode('a', { addSpecialTokens: false }));
    this.anchorText = tokenizer.decode(this.anchor);
  }

  private entry(id: number): { text: string; bytes: number[] | null } {
    let e = this.cache.get(id);
    if (e) return e;
    const t = this.tokenizer;
    if (!t) {
      // Without a tokenizer a token is named by its id, as vLLM's return_tokens_as_token_ids does.
      e = { text: `token_id:${id}`, bytes: null };
    } else {
      const raw = t.rawBytes?.(id);
      const special = t.specialText?.(id);
      let text = special ?? t.decode([...this.anchor, id]).slice(this.anchorText.length);
      // Part of a character (a lone UTF-8 byte) has no text of its own: named by its bytes as vLLM does,
      // so distinct bytes stay distinct keys of top_logprobs.
      if (raw && text.includes('\uFFFD')) text = `bytes:${raw.map((b) => `\\x${b.toString(16).padStart(2, '0')}`).join('')}`;
      e = { text, bytes: raw ?? Array.from(Buffer.from(text, 'utf8')) };
    }
    if (this.cache.size < 1 << 16) this.cache.set(id, e);
    return e;
  }

  text(id: number): string {
    return this.entry(id).text;
  }

  bytes(id: number): number[] | null {
    return this.entry(id).bytes;
  }
}

const textsOf = new WeakMap<TextTokenizer, TokenTexts>();
let idTexts: TokenTexts | undefined;

/** The token names of a tokenizer, shared by every endpoint (none: `token_id:N`). */
export function tokenTexts(tokenizer: TextTokenizer | undefined): TokenTexts {
  if (!tokenizer) return (idTexts ??= new TokenTexts(undefined));
  let texts = textsOf.get(tokenizer);
  if (!texts) textsOf.set(tokenizer, (texts = new TokenTexts(tokenizer)));
  return texts;
}

export interface LegacyLogprobs {
  tokens: string[];
  token_logprobs: Array<number | null>;
  top_logprobs: Array<Record<string, number> | null>;
  text_offset: number[];
}

/**
 * /v1/completions' logprobs for `ids` (null entries: the prompt's first id, which nothing predicts).
 * `top_logprobs` holds the most likely ids and the chosen one (OpenAI: up to logprobs + 1 entries);
 * text offsets run on from `offset` by each token's text.
 */
export function legacyLogprobs(ids: readonly number[], logprobs: ReadonlyArray<TokenLogprob | null>, texts: TokenTexts, offset: number): LegacyLogprobs {
  const out: LegacyLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  ids.forEach((id, i) => {
    const lp = logprobs[i];
    const text = texts.text(id);
    out.tokens.push(text);
    out.text_offset.push(offset);
    offset += text.length;
    if (!lp) {
      out.token_logprobs.push(null);
      out.top_logprobs.push(null);
      return;
    }
    out.token_logprobs.push(lp.logprob);
    const top: Record<string, number> = {};
    for (const alt of lp.top) top[texts.text(alt.id)] ??= alt.logprob;
    top[text] = lp.logprob; // the chosen token is always listed with its own value
    out.top_logprobs.push(top);
  });
  return out;
}

/** The text length the entries of legacyLogprobs advance the offset by. */
export function textLength(ids: readonly number[], texts: TokenTexts): number {
  return ids.reduce((n, id) => n + texts.text(id).length, 0);
}

export interface ChatLogprob {
  token: string;
  logprob: number;
  bytes: number[] | null;
  top_logprobs: Array<{ token: string; logprob: number; bytes: number[] | null }>;
}

/** Chat's `logprobs.content` entries: exactly the asked number of alternatives each. */
export function chatLogprobs(logprobs: readonly TokenLogprob[], texts: TokenTexts): ChatLogprob[] {
  return logprobs.map((lp) => ({
    token: texts.text(lp.id), logprob: lp.logprob, bytes: texts.bytes(lp.id),
    top_logprobs: lp.top.map((alt) => ({ token: texts.text(alt.id), logprob: alt.logprob, bytes: texts.bytes(alt.id) })),
  }));
}
