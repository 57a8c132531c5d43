// Real services as child processes on 127.0.0.1 (ephemeral ports), always stopped: by the test's
// `after`, and at the latest when the test process exits.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { repoRoot } from './paths.js';
import { EXIT_WITH_PARENT_ENV } from '../../services/cli/supervisor.js';

export interface RunningService {
  child: ChildProcess;
  /** The ready line's match (e.g. the listening address). */
  ready: RegExpMatchArray;
  /** Settles when the process has exited. */
  exited: Promise<void>;
  /** Everything it printed on stdout so far. */
  stdout: () => string;
  stderr: () => string;
  stop: () => Promise<void>;
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** `detached`: the service leads a process group of its own (as a shell's foreground job does). */
export interface SpawnPlace { cwd?: string; detached?: boolean }

/** A child process that is always stopped: `stop()` sends SIGTERM (SIGKILL after 10 s); `exited` settles on exit or spawn error. */
export interface TrackedChild {
  child: ChildProcess;
  exited: Promise<void>;
  stderr: () => string;
  stop: () => Promise<void>;
}

/** Spawns any command with piped stdout/stderr and the lifecycle above (killed at the latest when the test process exits). */
export function spawnTracked(command: string, args: string[], options: SpawnOptions = {}): TrackedChild {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  running.add(child);
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  // 'error' without 'exit' is a command that never started (not on PATH).
  const exited = new Promise<void>((resolve) => {
    const done = () => { running.delete(child); resolve(); };
    child.once('exit', done).once('error', (err) => { stderr += `${err.message}\n`; done(); });
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
  };
  return { child, exited, stderr: () => stderr, stop };
}

export function startService(args: string[], readyLine: RegExp, env: Record<string, string> = {}, timeoutMs = 60_000, place: SpawnPlace = {}): Promise<RunningService> {
  const { child, exited, stderr, stop } = spawnTracked(process.execPath, [join(repoRoot, 'dist', 'services', 'cli', 'main.js'), ...args], {
    env: { ...process.env, [EXIT_WITH_PARENT_ENV]: '1', ...env }, ...place,
  });
  let stdout = '';
  return new Promise<RunningService>((resolve, reject) => {
    const timer = setTimeout(() => { void stop(); reject(new Error(`service ${args.join(' ')} not ready within ${timeoutMs} ms: ${stderr()}`)); }, timeoutMs);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      stdout += line + '\n';
      const match = line.match(readyLine);
      if (match) {
        clearTimeout(timer);
        resolve({ child, ready: match, exited, stdout: () => stdout, stderr, stop });
      }
    });
    void exited.then(() => { clearTimeout(timer); reject(new Error(`service ${args.join(' ')} exited early: ${stderr()}`)); });
  });
}
