// Routing decisions of a forward as flat arrays, for comparing two runs' choices layer by layer.
import type { MoeStats } from '../../services/core/model/moe.js';

/** Per MoE layer, the chosen expert of every (token, choice) over all routing groups, in order. */
export function choicesOf(stats: MoeStats[]): Int32Array[] {
  return stats.map((s) => {
    const out = new Int32Array(s.plans.reduce((n, p) => n + p.expert.length, 0));
    let at = 0;
    for (const p of s.plans) {
      out.set(p.expert, at);
      at += p.expert.length;
    }
    return out;
  });
}
