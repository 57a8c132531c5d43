// The text of a completion as its ids arrive, decoded incrementally (as HF TextStreamer / TGI do): only
// a short window of ids is decoded per id, behind a few ids already turned into text (the look-behind),
// so a SentencePiece decoder that strips the first token's leading space strips it from the look-behind,
// not from the completion ("hello" + "▁world" continues with " world"). Text is settled, never to change
// again, only once no later id can rewrite it: not while it ends inside a character still missing bytes
// (U+FFFD), and not in the tokenizer's last `rewritableChars` (clean_up_tokenization_spaces).
import type { TextTokenizer } from './types.js';

/** Ids decoded in front of the pending ones: enough for any decoder's look-behind. */
const LOOK_BEHIND = 6;

export class CompletionText {
  /** Look-behind ids, then the ids whose text is not settled yet. */
  private window: number[];
  private lookBehind: number;
  private lookBehindText: string;
  /** Text that later ids can no longer change; it only ever grows at its end. */
  settled = '';
  /** The text of the ids after the settled ones, as decoded now (it may still change). */
  pending = '';

  constructor(private readonly tokenizer: TextTokenizer, promptIds: ArrayLike<number>) {
    this.window = Array.from(promptIds).slice(-LOOK_BEHIND);
    this.lookBehind = this.window.length;
    this.lookBehindText = tokenizer.decode(this.window);
  }

  /** The whole completion so far; a last character still missing bytes shows as U+FFFD. */
  get text(): string {
    return this.settled + this.pending;
  }

  /** Adds generated ids. */
  push(...ids: number[]): void {
    this.window.push(...ids);
    const whole = this.tokenizer.decode(this.window);
    // Where the look-behind's text ends in `whole`. A decoder that rewrote the end of the prompt (clean-up
    // of its last characters) is cut where the two still agree.
    const start = commonPrefix(whole, this.lookBehindText);
    this.pending = whole.slice(start);
    const stable = whole.replace(/\uFFFD+$/, '').length - this.tokenizer.rewritableChars;
    if (stable <= start) return;
    // Settle the longest run of ids whose text is a prefix of `whole` that nothing later can change.
    for (let end = this.window.length; end > this.lookBehind; end--) {
      const prefix = end === this.window.length ? whole : this.tokenizer.decode(this.window.slice(0, end));
      if (prefix.length > stable || prefix.length < start || !whole.startsWith(prefix)) continue;
      this.settled += prefix.slice(start);
      this.pending = whole.slice(prefix.length);
      const from = Math.max(0, end - LOOK_BEHIND);
      this.window = this.window.slice(from);
      this.lookBehind = end - from;
      this.lookBehindText = this.tokenizer.decode(this.window.slice(0, this.lookBehind));
      return;
    }
  }
}

function commonPrefix(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  return i;
}
