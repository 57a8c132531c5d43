// Child processes of one local run, supervised the way Kubernetes would: each runs `switchyard ...`, its
// output goes to a log file, and a child that dies unexpectedly is started again after a backoff, so
// the run recovers by itself; only a crash loop gives up. processes.json always lists the live pids.
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

/**
 * When a child with `restart` is started again. Like a Deployment's CrashLoopBackOff: the delay doubles
 * with every exit still inside the window, and `maxExits` exits inside `windowMs` give up on it.
 */
export interface RestartPolicy {
  maxExits: number;
  windowMs: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  /** Also restart a child that exited with code 0 (services are meant to run until stopped). */
  restartOnSuccess: boolean;
}

/** Training runs: a child may fail 5 times in the whole run, restarted at once (the run resumes from its checkpoint). */
export const RUN_RESTARTS: RestartPolicy = { maxExits: 6, windowMs: Infinity, initialBackoffMs: 0, maxBackoffMs: 0, restartOnSuccess: false };

/** Long-running services (`up`): 0.5, 1, 2, 4 s backoff; 5 exits within 60 s are a crash loop. */
export const SERVICE_RESTARTS: RestartPolicy = { maxExits: 5, windowMs: 60_000, initialBackoffMs: 500, maxBackoffMs: 10_000, restartOnSuccess: true };

interface Supervised {
  spec: ChildSpec;
  process: ChildProcess;
  /** Times of this child's unexpected exits (those inside the policy's window count). */
  exits: number[];
  log: WriteStream;
  exited: Promise<number | null>;
  done: boolean;
  /** A restart waiting out its backoff. */
  pendingRestart?: NodeJS.Timeout;
}

export class Supervisor {
  private readonly children = new Map<string, Supervised>();
  stopping = false;
  /** Called when a child cannot be kept running (a crash loop, or failed without `restart`). */
  onFailure?: (name: string, why: string) => void;
  /** Called when a child exits with code 0 and the policy does not restart it (its work is done). */
  onDone?: (name: string) => void;
  /** Called when a restarted child is ready again. */
  onRestarted?: (name: string, ready: RegExpMatchArray) => void;

  constructor(readonly logDir: string, readonly log: (line: string) => void, readonly policy: RestartPolicy = RUN_RESTARTS) {}

  logFileOf(name: string): string {
    return join(this.logDir, `${name}.log`);
  }

  async start(spec: ChildSpec): Promise<RegExpMatchArray> {
    await mkdir(this.logDir, { recursive: true });
    if (this.stopping) throw new Error(`not starting ${spec.name}: stopping`);
    const previous = this.children.get(spec.name);
    const log = previous?.log ?? createWriteStream(this.logFileOf(spec.name), { flags: 'a' });
    const env = { ...process.env, [EXIT_WITH_PARENT_ENV]: '1', ...(spec.env ?? {}) };
    const child = spawn(process.execPath, [CLI, ...spec.args], { stdio: ['ignore', 'pipe', 'pipe'], env });
    const entry: Supervised = {
      spec, process: child, exits: previous?.exits ?? [], log, done: false,
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
      child.once('exit', (code, signal) => reject(new Error(`${spec.name} exited (${signal ?? `code ${code}`}) before it was ready; see ${this.logFileOf(spec.name)}`)));
    });
    child.once('exit', (code, signal) => {
      if (this.stopping || entry.done || this.children.get(spec.name) !== entry) return;
      const policy = this.policy;
      if (code === 0 && !policy.restartOnSuccess) {
        entry.done = true;
        this.onDone?.(spec.name);
        return;
      }
      const why = `${spec.name} exited (${signal ?? `code ${code}`})`;
      if (!spec.restart) {
        this.onFailure?.(spec.name, `${why}; see ${this.logFileOf(spec.name)}`);
        return;
      }
      const now = Date.now();
      entry.exits = [...entry.exits.filter((t) => now - t < policy.windowMs), now];
      const recent = entry.exits.length;
      if (recent >= policy.maxExits) {
        const within = Number.isFinite(policy.windowMs) ? ` within ${policy.windowMs / 1000} s` : '';
        this.onFailure?.(spec.name, `${why}; it exited ${recent} times${within}, so it is not restarted again; see ${this.logFileOf(spec.name)}`);
        return;
      }
      const delayMs = policy.initialBackoffMs === 0 ? 0 : Math.min(policy.maxBackoffMs, policy.initialBackoffMs * 2 ** (recent - 1));
      this.log(`switchyard: ${why}; restarting it${delayMs > 0 ? ` in ${delayMs / 1000} s` : ''} (exit ${recent} of ${policy.maxExits - 1} allowed${Number.isFinite(policy.windowMs) ? ` per ${policy.windowMs / 1000} s` : ''}; log ${this.logFileOf(spec.name)})`);
      entry.pendingRestart = setTimeout(() => {
        entry.pendingRestart = undefined;
        if (this.stopping) return;
        // An exit before ready is counted by this same handler on the new entry; nothing else to do here.
        this.start({ ...entry.spec }).then((m) => this.onRestarted?.(spec.name, m), () => undefined);
      }, delayMs);
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
    for (const c of this.children.values()) clearTimeout(c.pendingRestart);
    for (const c of order([...this.children.keys()]).map((name) => this.children.get(name)!)) {
      if (c.process.exitCode === null && c.process.signalCode === null) {
        c.process.kill('SIGTERM');
        const timer = setTimeout(() => {
          this.log(`switchyard: ${c.spec.name} did not stop within 10 s of SIGTERM; killing it (see ${this.logFileOf(c.spec.name)})`);
          c.process.kill('SIGKILL');
        }, 10_000);
        await c.exited;
        clearTimeout(timer);
      }
      c.log.end();
    }
  }
}
