// Which experts a shard serves, as given on its command line: `all`; `none` (elastic: the coordinator
// assigns experts); `spread:I/N`, shard I's part of the
// default placement over N shards (a StatefulSet pod passes its ordinal); or `LAYER:EXPERTS` groups
// separated by `;`, where EXPERTS is a comma list of ids and ranges, e.g. `0:0-3;1:0,2`.
import { expertKeyText, expertLayerList, spreadExperts, type ExpertKey, type ExpertLayers } from '../core/placement.js';

export type { ExpertKey };

export class AssignmentError extends RangeError {
  override name = 'AssignmentError';
}

export function parseAssignment(spec: string, layers: ExpertLayers, experts: number): ExpertKey[] {
  const keys: ExpertKey[] = [];
  const seen = new Set<string>();
  const layerList = expertLayerList(layers);
  const add = (layer: number, expert: number) => {
    if (!layerList.includes(layer)) throw new AssignmentError(`--experts '${spec}': layer ${layer} has no experts (layers with experts: ${layerList.join(', ')})`);
    if (!(expert >= 0 && expert < experts)) throw new AssignmentError(`--experts '${spec}': expert ${expert} is outside 0..${experts - 1}`);
    const key = expertKeyText({ layer, expert });
    if (seen.has(key)) return;
    seen.add(key);
    keys.push({ layer, expert });
  };
  // An elastic shard: it starts empty and the coordinator's planner gives it experts.
  if (spec.trim() === 'none') return keys;
  if (spec.trim() === 'all') {
    for (const l of layerList) for (let e = 0; e < experts; e++) add(l, e);
    return keys;
  }
  const spread = spec.trim().match(/^spread:(\d+)\/(\d+)$/);
  if (spread) {
    const [index, shards] = [Number(spread[1]), Number(spread[2])];
    if (!(shards >= 1 && index < shards)) throw new AssignmentError(`--experts '${spec}': shard index must be in 0..N-1 with N ≥ 1`);
    return spreadExperts(layers, experts, shards)[index];
  }
  const int = (text: string): number => {
    if (!/^\d+$/.test(text.trim())) throw new AssignmentError(`--experts '${spec}': '${text}' is not a non-negative integer`);
    return Number(text);
  };
  for (const group of spec.split(';').filter((g) => g.trim())) {
    const [layerText, list, extra] = group.split(':');
    if (list === undefined || extra !== undefined) throw new AssignmentError(`--experts '${spec}': expected LAYER:EXPERTS in '${group}'`);
    const layer = int(layerText);
    for (const part of list.split(',')) {
      const [from, to] = part.split('-');
      const first = int(from);
      const last = to === undefined ? first : int(to);
      if (last < first) throw new AssignmentError(`--experts '${spec}': empty range '${part}'`);
      for (let e = first; e <= last; e++) add(layer, e);
    }
  }
  if (keys.length === 0) throw new AssignmentError(`--experts '${spec}' names no expert`);
  return keys;
}
