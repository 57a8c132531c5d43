// Exponentially decaying sums: recent per-second rates without keeping samples (router load windows,
// a shard's recent rows per second).
export class DecayingRates {
  readonly values: Float64Array;
  private at = Date.now();

  constructor(size: number, readonly halfLifeS: number) {
    this.values = new Float64Array(size);
  }

  private decay(now: number): void {
    if (now <= this.at) return;
    const f = Math.pow(0.5, (now - this.at) / 1000 / this.halfLifeS);
    for (let i = 0; i < this.values.length; i++) this.values[i] *= f;
    this.at = now;
  }

  /** `now`: callers adding many values at once read the clock once and pass it (one decay per batch). */
  add(i: number, amount: number, now = Date.now()): void {
    this.decay(now);
    this.values[i] += amount;
  }

  /** Per-second rates: a decaying sum divided by the window's effective length. */
  rates(): number[] {
    this.decay(Date.now());
    const seconds = this.halfLifeS / Math.LN2;
    return Array.from(this.values, (v) => v / seconds);
  }
}
