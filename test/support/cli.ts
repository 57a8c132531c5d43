// Runs the built `switchyard` executable as a child process (always awaited, so nothing outlives a test).
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from './paths.js';

export interface CliResult { code: number; stdout: string; stderr: string }

export function runCli(args: string[], env: Record<string, string> = {}, cwd = repoRoot, timeoutMs = 300_000): Promise<CliResult> {
  const bin = join(repoRoot, 'dist', 'services', 'cli', 'main.js');
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd, env: { ...process.env, ...env }, timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}
