// TEMPORARY shim until the sampling branch lands (replaced wholesale by it).
import { Rng } from './data/random.js';
import { checkSampling as checkOld, sampleNext, SamplingError, type SamplingOptions as Old } from './generate.js';

export { SamplingError };
export type SamplingOptions = Omit<Old, 'seed'> & { seed?: number };
export function checkSampling(o: SamplingOptions, _vocab: number): void {
  checkOld({ ...o, seed: o.seed ?? 0 });
}
export class Sampler {
  readonly seed: number;
  private rng: Rng;
  constructor(private o: SamplingOptions, _prompt: Int32Array, _vocab: number) {
    this.seed = o.seed ?? 0;
    this.rng = new Rng(this.seed);
  }
  next(logits: Float32Array): number {
    return sampleNext(logits, this.o, this.rng);
  }
}
