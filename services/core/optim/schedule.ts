// Linear warmup to the peak learning rate, then cosine decay to min_lr_ratio · peak at the last step.
export interface ScheduleSettings { lr: number; warmup_steps: number; steps: number; min_lr_ratio: number }

/** Learning rate for 1-based `step`. */
export function learningRate(s: ScheduleSettings, step: number): number {
  if (s.warmup_steps > 0 && step <= s.warmup_steps) return (s.lr * step) / s.warmup_steps;
  const span = Math.max(1, s.steps - s.warmup_steps);
  const progress = Math.min(1, (step - s.warmup_steps) / span);
  const minLr = s.lr * s.min_lr_ratio;
  return minLr + 0.5 * (s.lr - minLr) * (1 + Math.cos(Math.PI * progress));
}
