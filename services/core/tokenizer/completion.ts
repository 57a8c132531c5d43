// The text of a completion as its ids grow. The ids are decoded whole each time, never token by token
// (a character split over byte-fallback tokens only appears once all its bytes are there), and behind
// the last prompt tokens, so a SentencePiece decoder that strips the first token's leading space strips
// it from the prompt, not from the completion ("hello" + "▁world" continues with " world").
import type { TextTokenizer } from './types.js';

/** Prompt tokens decoded in front of the completion: enough for any decoder's look-behind. */
const CONTEXT_TOKENS = 6;

export class CompletionText {
  private readonly context: number[];
  private readonly contextText: string;

  constructor(private readonly tokenizer: TextTokenizer, promptIds: ArrayLike<number>) {
    this.context = Array.from(promptIds).slice(-CONTEXT_TOKENS);
    this.contextText = tokenizer.decode(this.context);
  }

  /** The text of `ids` (the completion so far); a last character still missing bytes shows as U+FFFD. */
  text(ids: ArrayLike<number>): string {
    if (ids.length === 0) return '';
    const whole = this.tokenizer.decode([...this.context, ...Array.from(ids)]);
    // A decoder whose output for the prompt is not a prefix of the whole: fall back to the completion alone.
    return whole.startsWith(this.contextText) ? whole.slice(this.contextText.length) : this.tokenizer.decode(ids);
  }
}
