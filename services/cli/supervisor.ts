// Child processes of one local run, supervised the way Kubernetes would: each runs `switchyard ...`, its
// output goes to a log file, and a child that dies unexpectedly is started again (with a limit), so
// the run recovers by itself. processes.json always lists the live pids.
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('./main.js', import.meta.url));

/** Set by a parent (`up`, `train`, tests) so a service never outlives it, even when the parent is killed outright. */
export const EXIT_WITH_PARENT_ENV = 'SWITCHYARD_EXIT_WITH_PARENT';

/** In a process started with EXIT_WITH_PARENT_ENV: calls `onGone` once its parent is gone (re-parented), checked every 500 ms. */
export function whenParentGone(onGone: () => void): void {
  if (process.env[EXIT_WITH_PARENT_ENV] !== '1') return;
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(timer);
    onGone();
  }, 500).unref();
}

export interface ChildSpec {
  name: string;
  args: string[];
  /** stdout line that means "ready"; its match is returned by start(). */
  ready: RegExp;
  /** Restart when it exits unexpectedly (a crash, kill -9). */
  restart: boolean;
  /** Every stdout line (e.g. progress). */
  onLine?: (line: string) => void;
  env?: Record<string, string>;
}

interface Supervised {
  spec: ChildSpec;
  process: ChildProcess;
  restarts: number;
  log: WriteStream;
  exited: Promise<number | null>;
  done: boolean;
}

export class Supervisor {
  private readonly children = new Map<string, Supervised>();
  stopping = false;
  /** Called when a child cannot be kept running (exhausted restarts, or failed without a restart policy). */
  onFailure?: (name: string, why: string) => void;
  /** Called when a child exits with code 0 (its work is done). */
  onDone?: (name: string) => void;

  constructor(readonly logDir: string, readonly log: (line: string) => void, readonly maxRestarts = 5) {}

  async start(spec: ChildSpec): Promise<RegExpMatchArray> {
    await mkdir(this.logDir, { recursive: true });
    if (this.stopping) throw new Error(`not starting ${spec.name}: stopping`);
    const log = this.children.get(spec.name)?.log ?? createWriteStream(join(this.logDir, `${spec.name}.log`), { flags: 'a' });
    const env = { ...process.env, [EXIT_WITH_PARENT_ENV]: '1', ...(spec.env ?? {}) };
    const child = spawn(process.execPath, [CLI, ...spec.args], { stdio: ['ignore', 'pipe', 'pipe'], env });
    const entry: Supervised = {
      spec, process: child, restarts: this.children.get(spec.name)?.restarts ?? 0, log, done: false,
      exited: new Promise((resolve) => child.once('exit', (code) => resolve(code))),
    };
    this.children.set(spec.name, entry);
    createInterface({ input: child.stderr! }).on('line', (line) => log.write(line + '\n'));
    const ready = new Promise<RegExpMatchArray>((resolve, reject) => {
      createInterface({ input: child.stdout! }).on('line', (line) => {
        log.write(line + '\n');
        const m = line.match(spec.ready);
        if (m) resolve(m);
        spec.onLine?.(line);
      });
      child.once('exit', (code, signal) => reject(new Error(`${spec.name} exited (${signal ?? `code ${code}`}) before it was ready; see ${join(this.logDir, `${spec.name}.log`)}`)));
    });
    child.once('exit', (code, signal) => {
      if (this.stopping || entry.done || this.children.get(spec.name) !== entry) return;
      if (code === 0) {
        entry.done = true;
        this.onDone?.(spec.name);
        return;
      }
      const why = `${spec.name} exited (${signal ?? `code ${code}`})`;
      if (spec.restart && entry.restarts < this.maxRestarts) {
        entry.restarts++;
        this.log(`switchyard: ${why}; restarting it (${entry.restarts}/${this.maxRestarts})`);
        this.start({ ...entry.spec }).catch((err: Error) => this.onFailure?.(spec.name, err.message));
      } else {
        this.onFailure?.(spec.name, `${why}; see ${join(this.logDir, `${spec.name}.log`)}`);
      }
    });
    // After the listeners: a child that exits at once still settles `ready`.
    await this.writePids();
    return ready;
  }

  /** Arguments for the child's future restarts (e.g. pin the port it got, so peers find it again). */
  setArgs(name: string, args: string[]): void {
    const c = this.children.get(name);
    if (!c) throw new Error(`no child ${name}`);
    c.spec = { ...c.spec, args };
  }

  pids(): Record<string, number> {
    return Object.fromEntries([...this.children].map(([name, c]) => [name, c.process.pid ?? -1]));
  }

  private async writePids(): Promise<void> {
    await writeFile(join(this.logDir, 'processes.json'), JSON.stringify(this.pids(), null, 2) + '\n');
  }

  /** SIGTERM to every live child (in reverse start order unless `order` sorts the names), SIGKILL after 10 s. */
  async stop(order: (names: string[]) => string[] = (names) => names.reverse()): Promise<void> {
    this.stopping = true;
    for (const c of order([...this.children.keys()]).map((name) => this.children.get(name)!)) {
      if (c.process.exitCode === null && c.process.signalCode === null) {
        c.process.kill('SIGTERM');
        const timer = setTimeout(() => {
          this.log(`switchyard: ${c.spec.name} did not stop within 10 s of SIGTERM; killing it (see ${join(this.logDir, `${c.spec.name}.log`)})`);
          c.process.kill('SIGKILL');
        }, 10_000);
        await c.exited;
        clearTimeout(timer);
      }
      c.log.end();
    }
  }
}
