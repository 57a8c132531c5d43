// The generations behind one API request: every prompt × `n` choices run concurrently through the
// engine (they share its steps and the prefix cache), and the request fails as a whole when one of them
// fails — the others are stopped, so nothing keeps generating for an answer that will not be sent.
import type { TokenLogprob } from '../core/logprobs.js';
import type { SamplingOptions } from '../core/sampling.js';
import type { RouterEngine } from './engine.js';
import type { Generation, LogprobRequest } from './scheduler.js';

/** Largest prompts × n one request may ask for. */
export const MAX_CHOICES = 64;

export interface ChoiceSpec {
  /** The prompt's ids, as the model sees them. */
  prompt: Int32Array;
  sampling: SamplingOptions;
}

export interface ChoiceRun {
  requestId: string;
  deadline: number;
  /** The client went away: every choice stops. */
  signal: AbortSignal;
  want: LogprobRequest;
  /** Each new id of choice `index`; true stops that choice (a stop sequence). */
  onToken?: (index: number, id: number, logprob?: TokenLogprob) => boolean | void;
}

/** `n` choices per prompt, in OpenAI's order (prompt by prompt); a seed gives choice j the seed + j (vLLM). */
export function choicesOf(prompts: Int32Array[], n: number, sampling: SamplingOptions): ChoiceSpec[] {
  return prompts.flatMap((prompt) =>
    Array.from({ length: n }, (_, j) => ({ prompt, sampling: { ...sampling, ...(sampling.seed !== undefined ? { seed: sampling.seed + j } : {}) } })));
}

export async function runChoices(engine: RouterEngine, specs: ChoiceSpec[], run: ChoiceRun): Promise<Generation[]> {
  const stop = new AbortController();
  const abort = () => stop.abort();
  run.signal.addEventListener('abort', abort, { once: true });
  if (run.signal.aborted) stop.abort();
  try {
    return await Promise.all(specs.map((spec, index) =>
      engine.complete(spec.prompt, spec.sampling, run.onToken ? (id, logprob) => run.onToken!(index, id, logprob) : undefined,
        run.requestId, run.deadline, stop.signal, run.want)
        .catch((err: unknown) => {
          stop.abort();
          throw err;
        })));
  } finally {
    run.signal.removeEventListener('abort', abort);
  }
}
