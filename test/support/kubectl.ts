// kubectl renders the kustomizations offline. They use `labels:` and `replacements:`, which need the
// kustomize v5 built into kubectl ≥ 1.27 (Debian's kubernetes-client, 1.20, rejects them). Tests that
// render ask `kubectlGate` first: without a recent enough kubectl they skip and say why; with one, every
// render error is a failure.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { repoRoot } from './paths.js';

const MIN_VERSION = { major: 1, minor: 27 };

/** Why a kubectl whose `kubectl version --client -o json` printed `json` cannot render the overlays, if it cannot. */
export function kubectlTooOld(json: string): string | undefined {
  const { clientVersion: v } = JSON.parse(json) as { clientVersion: { major: string; minor: string; gitVersion?: string } };
  // Minor versions of vendor builds carry a '+' (e.g. "32+").
  const major = parseInt(v.major, 10);
  const minor = parseInt(v.minor, 10);
  if (major > MIN_VERSION.major || (major === MIN_VERSION.major && minor >= MIN_VERSION.minor)) return undefined;
  return `kubectl ${v.gitVersion ?? `${v.major}.${v.minor}`} is older than ${MIN_VERSION.major}.${MIN_VERSION.minor} (its kustomize cannot render the overlays)`;
}

function skipReason(): string | undefined {
  let json: string;
  try {
    json = execFileSync('kubectl', ['version', '--client', '-o', 'json'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'kubectl is not installed (it renders the kustomizations offline)';
    throw err;
  }
  return kubectlTooOld(json);
}

/** Test options for tests that render kustomizations: `{}`, or a skip with the reason. */
export const kubectlGate: { skip?: string } = (() => {
  const reason = skipReason();
  return reason ? { skip: reason } : {};
})();

/** The objects `kubectl kustomize` renders from a folder under the repository root. */
export function renderKustomization<T = Record<string, unknown>>(dir: string): T[] {
  const text = execFileSync('kubectl', ['kustomize', join(repoRoot, dir)], { encoding: 'utf8', maxBuffer: 64 * 2 ** 20 });
  return parseAllDocuments(text).map((d) => d.toJSON() as T).filter(Boolean);
}
