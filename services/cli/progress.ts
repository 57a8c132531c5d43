// Progress on the terminal: training (a bar when stderr is a TTY, else one plain line per validation) and
// downloads (`switchyard pull`: a byte bar over every file, else one line per file).
import cliProgress from 'cli-progress';
import type { StepReport } from '../core/train/trainer.js';

export function trainingProgress(log: (line: string) => void = (l) => process.stderr.write(l + '\n')): { onStep: (r: StepReport) => void; stop: () => void } {
  const tty = process.stderr.isTTY === true;
  let bar: cliProgress.SingleBar | undefined;
  let lastValidation = '—';
  // Per-step rates jitter (validation and checkpoint steps are slower): show a moving average.
  let rate = 0;
  return {
    onStep(r: StepReport) {
      if (r.validationLoss !== undefined) lastValidation = r.validationLoss.toFixed(3);
      rate = rate === 0 ? r.tokensPerSecond : 0.9 * rate + 0.1 * r.tokensPerSecond;
      const fields = { loss: r.loss.toFixed(3), val: lastValidation, tps: Math.round(rate) };
      if (tty) {
        if (!bar) {
          bar = new cliProgress.SingleBar({
            format: 'train |{bar}| {value}/{total} steps | loss {loss} | val {val} | {tps} tok/s | ETA {eta_formatted}',
            etaBuffer: 20, hideCursor: true,
          }, cliProgress.Presets.shades_classic);
          bar.start(r.steps, r.step - 1, fields);
        }
        bar.update(r.step, fields);
      } else if (r.validationLoss !== undefined || r.step === 1) {
        log(`step ${r.step}/${r.steps}  loss ${fields.loss}  val ${fields.val}  ${fields.tps} tok/s  ${r.elapsedSeconds.toFixed(0)} s`);
      }
    },
    stop() {
      bar?.stop();
    },
  };
}

/** Bytes of a download over several files; `tty` false logs lines instead of drawing a bar. */
export class DownloadProgress {
  private bar?: cliProgress.SingleBar;
  private total = 0;
  private done = 0;
  constructor(private readonly tty: boolean, private readonly log: (line: string) => void) {}
  add(bytes: number): void {
    this.total += bytes;
    if (!this.tty) return;
    if (!this.bar) {
      this.bar = new cliProgress.SingleBar({
        format: 'pull |{bar}| {percentage}% | {mb}/{totalMb} MB | {file}', hideCursor: true,
      }, cliProgress.Presets.shades_classic);
      this.bar.start(this.total, this.done, this.fields(''));
    } else {
      this.bar.setTotal(this.total);
    }
  }
  private file = '';
  private fields(file: string) {
    this.file = file;
    return { file, mb: (this.done / 1e6).toFixed(1), totalMb: (this.total / 1e6).toFixed(1) };
  }
  advance(bytes: number, file = this.file): void {
    this.done += bytes;
    this.bar?.update(this.done, this.fields(file));
  }
  line(text: string): void {
    if (this.bar) this.bar.update(this.done, this.fields(text));
    else this.log(text);
  }
  stop(): void {
    this.bar?.stop();
  }
}
