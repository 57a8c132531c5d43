// A completion's text as generated ids arrive: cut at the first stop sequence, and handed out in
// settled pieces for streaming. Each id costs work bounded by the tokens not yet settled and the longest
// stop, not by the length of the completion: the text is decoded incrementally (CompletionText) and
// only its new tail is searched for stops.
import { CompletionText, type TextTokenizer } from '../core/tokenizer/index.js';

export class CompletionStream {
  private readonly completion: CompletionText;
  /** Characters at the end that could still turn out to begin a stop sequence. */
  private readonly holdBack: number;
  /** Length of the settled text when stops were last searched: no stop starts before it less holdBack. */
  private searchedSettled = 0;
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
    this.completion.push(id);
    const whole = this.completion.text;
    this.text = whole;
    // A stop starting before `from` would lie wholly inside settled text that an earlier push searched.
    const from = Math.max(0, this.searchedSettled - this.holdBack);
    this.searchedSettled = this.completion.settled.length;
    // Cut at the earliest match in the text, whichever stop it is (one id can bring in several).
    const cut = Math.min(...this.stops.map((s) => whole.indexOf(s, from)).filter((at) => at >= 0));
    if (cut !== Infinity) {
      this.text = whole.slice(0, cut);
      this.stopped = true;
      return this.rest();
    }
    // Only settled text (no later id can change it), and never the last characters that could still begin
    // a stop sequence.
    const ready = Math.min(this.completion.settled.length, whole.length - this.holdBack);
    if (ready <= this.emitted.length) return '';
    const piece = whole.slice(this.emitted.length, ready);
    this.emitted += piece;
    return piece;
  }

  /** The text not handed out yet, once generation has ended. */
  rest(): string {
    const piece = this.text.slice(this.emitted.length);
    this.emitted = this.text;
    return piece;
  }
}
