// Log-probabilities of tokens under one row of logits: what OpenAI's `logprobs` / `top_logprobs` and
// vLLM's prompt logprobs report. They are the model's own distribution (log-softmax of the raw logits,
// vLLM's default `raw_logprobs`): temperature, penalties, logit_bias and top-k/p do not change them.

/** Largest `top_logprobs` / `logprobs` count a request may ask for (vLLM's default max_logprobs). */
export const MAX_TOP_LOGPROBS = 20;

export interface Alternative {
  id: number;
  logprob: number;
}

export interface TokenLogprob extends Alternative {
  /** The most likely ids at this position, most likely first (ties: lower id first); `top` of them. */
  top: Alternative[];
}

/** log Σ exp(row), in float64. */
export function logSumExp(row: ArrayLike<number>): number {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  if (max === -Infinity) return -Infinity;
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  return max + Math.log(sum);
}

/**
 * The `count` most likely ids of a row, most likely first. One pass with a small sorted buffer: a row of
 * the vocabulary costs O(V) compares against the current k-th, never a sort of the row.
 */
export function topIds(row: ArrayLike<number>, count: number): number[] {
  const k = Math.min(count, row.length);
  const best: number[] = [];
  if (k <= 0) return best;
  for (let id = 0; id < row.length; id++) {
    const v = row[id];
    if (best.length === k && !(v > row[best[k - 1]])) continue; // ties keep the lower id already in
    let at = best.length === k ? k - 1 : best.length;
    while (at > 0 && v > row[best[at - 1]]) at--;
    if (best.length === k) best.pop();
    best.splice(at, 0, id);
  }
  return best;
}

/** The log-probability of `id` and of the `top` most likely ids under `row` (raw logits). */
export function tokenLogprob(row: ArrayLike<number>, id: number, top: number, lse = logSumExp(row)): TokenLogprob {
  return {
    id,
    logprob: row[id] - lse,
    top: topIds(row, top).map((t) => ({ id: t, logprob: row[t] - lse })),
  };
}
