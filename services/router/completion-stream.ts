// A completion's text as generated ids arrive: cut at the first stop sequence, and handed out in
// settled pieces for streaming.
import { CompletionText, type TextTokenizer } from '../core/tokenizer/index.js';

export class CompletionStream {
  private readonly ids: number[] = [];
  private readonly completion: CompletionText;
  /** Characters at the end that could still turn out to begin a stop sequence. */
  private readonly holdBack: number;
  private emitted = '';
  /** The text so far, cut before the first stop sequence. */
  text = '';
  /** True once a stop sequence appeared. */
  stopped = false;

  constructor(tokenizer: TextTokenizer, promptIds: ArrayLike<number>, private readonly stops: string[]) {
    this.completion = new CompletionText(tokenizer, promptIds);
    this.holdBack = Math.max(0, ...stops.map((s) => s.length - 1));
  }

  /** Adds a generated id; returns the newly settled text not handed out yet ('' when none). */
  push(id: number): string {
    this.ids.push(id);
    const whole = this.completion.text(this.ids);
    this.text = whole;
    // Cut at the earliest match in the text, whichever stop it is (one id can bring in several).
    const cut = Math.min(...this.stops.map((s) => whole.indexOf(s)).filter((at) => at >= 0));
    if (cut !== Infinity) {
      this.text = whole.slice(0, cut);
      this.stopped = true;
    }
    // Settled text only: nothing that ends inside a character still missing bytes (U+FFFD), and never
    // the last characters that could still begin a stop sequence.
    const settled = this.stopped ? this.text : this.text.slice(0, Math.max(0, this.text.length - this.holdBack));
    if (settled.length <= this.emitted.length || settled.endsWith('\uFFFD')) return '';
    const piece = settled.slice(this.emitted.length);
    this.emitted = settled;
    return piece;
  }

  /** The text not handed out yet, once generation has ended. */
  rest(): string {
    const piece = this.text.slice(this.emitted.length);
    this.emitted = this.text;
    return piece;
  }
}
