// Bearer tokens for the HTTP endpoints (router API, coordinator admin): read once from a file or the
// environment, compared in constant time.
import { timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { ConfigError } from './config.js';

export function bearerMatches(header: string | undefined, token: string): boolean {
  const given = Buffer.from(header?.startsWith('Bearer ') ? header.slice(7) : '');
  const want = Buffer.from(token);
  return given.length === want.length && timingSafeEqual(given, want);
}

/** The token in `file` (named `flag` in errors), else the environment variable `env`; undefined when neither is set. */
export async function readToken(file: string | undefined, flag: string, env: string): Promise<string | undefined> {
  if (file) {
    const token = (await readFile(file, 'utf8').catch((err: Error) => { throw new ConfigError(`${flag} ${file}: ${err.message}`); })).trim();
    if (!token) throw new ConfigError(`${flag} ${file} is empty`);
    return token;
  }
  return process.env[env]?.trim() || undefined;
}
