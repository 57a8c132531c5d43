#!/usr/bin/env node
// The `switchyard` command line (DESIGN §10).
import { Command, InvalidArgumentError } from 'commander';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { mkdir, readFile, rename, rm } from 'node:fs/promises';
import { basename, dirname, relative, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { BACKEND_CHOICES, describeBackend, initBackend } from '../core/backend.js';
import { ConfigError, PRESET_NAMES, parseModelConfig, parseTrainSettings, preset, resolvePreset, type Preset } from '../core/config.js';
import { CompletionText, loadTokenizer } from '../core/tokenizer/index.js';
import { generate } from '../router/scheduler.js';
import { inspectModel, loadExpertSet, loadModel } from '../core/checkpoint/model.js';
import { atomicWriteFile } from '../core/checkpoint/index.js';
import { assertTrainable, familyOf } from '../core/model/family.js';
import { parseAssignment } from '../expert/assignment.js';
import { startExpertServer } from '../expert/server.js';
import { DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_ROWS } from '../expert/shard.js';
import { creditsPerExpert } from '../core/placement.js';
import { startCoordinator } from '../coordinator/server.js';
import { buildAdminApp } from '../coordinator/admin.js';
import { readToken } from '../core/auth.js';
import { AssignmentFollower } from '../expert/follower.js';
import { placementCommand } from './placement.js';
import { healthCommand } from './health.js';
import { CoordinatorLink } from '../core/wire/coordinator-link.js';
import { DEFAULT_MICRO_BATCHES, RouterEngine } from '../router/engine.js';
import { DEFAULT_MIN_EXPERT_ROWS_PER_LANE } from '../core/model/model.js';
import { buildHttpApp } from '../router/http.js';
import { Cluster } from './cluster.js';
import { EXIT_WITH_PARENT_ENV, whenParentGone } from './supervisor.js';
import { importCommand, type ImportFlags } from './import.js';
import { hubCacheDir, hubEndpoint, hubNameOfSnapshot, linkSnapshot, parseHubName, pullModel, resolveModelDir } from './hub.js';
import type { FloatDtype } from '../core/dtypes.js';
import { checkpointDirOf, train } from '../core/train/trainer.js';
import { runBench } from '../bench/index.js';
import { trainingProgress } from './progress.js';
import { RUN_FILE, trainDistributed, type RunFile } from './train-cluster.js';
import { setBuildInfo, startMetricsServer } from '../core/metrics/registry.js';
import { TrainLink } from '../core/wire/train-link.js';
import { runRouterTraining } from '../router/trainer.js';
import { runShardTraining } from '../expert/trainer.js';
import { ExpertSet } from '../core/model/experts.js';
import { OVERFLOW_POLICIES, type OverflowPolicy } from '../core/overload.js';
import { MAX_MESSAGE_BYTES } from '../core/wire/protos.js';
import { checkMaxMessageBytes } from '../core/wire/message-size.js';

const DEFAULT_RUN_DIR = 'checkpoints/default';
/** Where `up` appends each service's output (`<name>.log`, and processes.json with the pids). */
const UP_LOG_DIR = 'runs/up';
/** `up`'s coordinator admin token, beside the logs. */
const ADMIN_TOKEN_FILE = 'admin-token';

function packageVersion(): string {
  const require = createRequire(import.meta.url);
  return (require('../../../package.json') as { version: string }).version;
}

function integer(name: string, min = 0) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer ≥ ${min}`);
    return n;
  };
}

function number(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
    return n;
  };
}

async function loadPreset(spec: string): Promise<Preset> {
  if (PRESET_NAMES.includes(spec)) return preset(spec);
  if (!existsSync(spec)) throw new ConfigError(`--config ${spec}: neither a preset (${PRESET_NAMES.join(', ')}) nor a file`);
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(spec, 'utf8'));
  } catch (err) {
    throw new ConfigError(`--config ${spec}: not valid JSON (${(err as Error).message})`);
  }
  return resolvePreset(raw, spec);
}

let backendAnnounced = false;

async function startBackend(service = 'cli'): Promise<void> {
  const info = await initBackend();
  setBuildInfo(packageVersion(), info.choice, service);
  if (!backendAnnounced) process.stderr.write(`switchyard: ${describeBackend(info)}\n`);
  backendAnnounced = true;
}

interface TrainFlags {
  config: string; data?: string; steps?: number; seed?: number; out: string;
  shards: number; routers: number; microBatches: number; singleProcess?: boolean; resume?: boolean; replicate?: string; host?: string;
}

/** `--replicate 0:1,1:3`: experts (LAYER:EXPERT) that get a second holder. */
function parseReplicate(spec: string | undefined, layers: number, experts: number): Array<{ layer: number; expert: number }> {
  if (!spec) return [];
  return spec.split(',').map((item) => {
    const m = item.trim().match(/^(\d+):(\d+)$/);
    if (!m) throw new ConfigError(`--replicate '${spec}': expected LAYER:EXPERT items separated by commas, e.g. 0:1,1:3`);
    const [layer, expert] = [Number(m[1]), Number(m[2])];
    if (layer >= layers || expert >= experts) throw new ConfigError(`--replicate '${item}': the model has ${layers} layers × ${experts} experts`);
    return { layer, expert };
  });
}

async function trainCommand(flags: TrainFlags): Promise<void> {
  const p = await loadPreset(flags.config);
  assertTrainable(p.model);
  const family = familyOf(p.model);
  const t = { ...p.train, ...(flags.steps !== undefined ? { steps: flags.steps } : {}), ...(flags.seed !== undefined ? { seed: flags.seed } : {}) };
  const distributed = !flags.singleProcess && (flags.shards > 1 || flags.routers > 1);
  if (flags.singleProcess && flags.replicate) throw new ConfigError('--replicate places experts on shards; it needs a distributed run (--shards ≥ 2)');
  // Started by a parent that must not be outlived (the bench): its going away stops the run as SIGTERM does.
  whenParentGone(() => process.kill(process.pid, 'SIGTERM'));
  await startBackend();
  const progress = trainingProgress();
  const outDir = resolve(flags.out);
  const summary = await (distributed
    ? trainDistributed({
      model: p.model, train: t, dataPath: flags.data, outDir, resume: flags.resume, routers: flags.routers, shards: flags.shards, microBatches: flags.microBatches,
      replicate: parseReplicate(flags.replicate, family.layers, family.experts), host: flags.host ?? '127.0.0.1',
      onStep: progress.onStep, log: (line) => process.stderr.write(line + '\n'),
    })
    : train({ model: p.model, train: t, dataPath: flags.data, outDir, resume: flags.resume, onStep: progress.onStep }))
    .finally(() => progress.stop());
  process.stdout.write(
    `trained ${summary.steps} steps on ${summary.dataSource}: ${summary.tokens} tokens in ${summary.wallSeconds.toFixed(1)} s ` +
    `(${summary.tokensPerSecond.toFixed(0)} tokens/s), loss ${summary.finalLoss.toFixed(4)}, ` +
    `validation loss ${summary.validationLoss.toFixed(4)} nats/byte\ncheckpoint: ${summary.checkpointDir}\n`,
  );
}

interface GenerateFlags { model: string; pull?: boolean; prompt: string; maxTokens: number; temperature: number; topP: number; seed?: number }

async function generateCommand(flags: GenerateFlags): Promise<void> {
  const dir = await resolveModelDir(flags.model, { pull: flags.pull });
  await startBackend();
  const model = await loadModel(dir);
  try {
    const tokenizer = await loadTokenizer(dir, model.config);
    const prompt = tokenizer.encode(flags.prompt);
    if (prompt.length === 0) throw new ConfigError('--prompt encodes to no tokens');
    const out = await generate(model, prompt, {
      maxTokens: flags.maxTokens, temperature: flags.temperature, topP: flags.topP, seed: flags.seed, stopIds: [...tokenizer.stopIds],
    });
    const completion = new CompletionText(tokenizer, prompt);
    completion.push(...out.ids);
    process.stdout.write(flags.prompt + completion.text + '\n');
  } finally {
    model.dispose();
  }
}

async function pullCommand(spec: string, flags: { link?: string }): Promise<void> {
  const name = parseHubName(spec);
  if (!name) throw new ConfigError(`pull ${spec}: expected ORG/NAME[@REVISION], e.g. mistralai/Mixtral-8x7B-v0.1`);
  process.stderr.write(`switchyard: pulling ${name.repo}@${name.revision} from ${hubEndpoint()} into ${hubCacheDir()}\n`);
  const r = await pullModel(name);
  process.stderr.write(`switchyard: ${r.repo} at ${r.commit}: ${r.files.length} files, ${r.downloadedBytes} bytes downloaded\n`);
  if (flags.link) {
    await linkSnapshot(flags.link, r.snapshot);
    process.stderr.write(`switchyard: ${resolve(flags.link)} → ${r.snapshot}\n`);
  }
  process.stdout.write(r.snapshot + '\n');
}

/** The default model: the 'small' preset trained this many steps (a few minutes on two cores). */
const DEFAULT_MODEL_CONFIG = 'small';
const DEFAULT_MODEL_STEPS = 250;

/**
 * Trains the default model into `modelDir` (a checkpoint folder) unless one is there. Training runs
 * beside it and the finished checkpoint is moved into place, so an interrupted run never leaves a
 * half-trained model that later runs would take for the default. `up`, compose and the k8s Job use it.
 */
async function prepareDefaultModel(modelDir: string): Promise<void> {
  if (existsSync(resolve(modelDir, 'config.json'))) return;
  const staging = `${modelDir}.training`;
  await rm(staging, { recursive: true, force: true });
  process.stderr.write(`switchyard: no default model yet; training the '${DEFAULT_MODEL_CONFIG}' config for ${DEFAULT_MODEL_STEPS} steps into ${modelDir} (one-time, a few minutes)\n`);
  await trainCommand({ config: DEFAULT_MODEL_CONFIG, steps: DEFAULT_MODEL_STEPS, out: staging, shards: 1, routers: 1, singleProcess: true, microBatches: 1 });
  await mkdir(dirname(modelDir), { recursive: true });
  await rename(checkpointDirOf(staging), modelDir);
  await rm(staging, { recursive: true, force: true });
}

async function prepareModelCommand(flags: { out: string }): Promise<void> {
  const modelDir = resolve(flags.out);
  if (existsSync(resolve(modelDir, 'config.json'))) process.stdout.write(`switchyard: ${modelDir} already holds a model\n`);
  else await prepareDefaultModel(modelDir);
}

/**
 * A fresh random bearer token for the coordinator's /admin/placement endpoint, in `<dir>/admin-token`
 * (mode 0600), so `switchyard placement` works on the local cluster out of the box. A new one each start:
 * a token from an earlier run stops working with that run.
 */
async function writeAdminToken(dir: string): Promise<string> {
  await mkdir(dir, { recursive: true });
  const file = resolve(dir, ADMIN_TOKEN_FILE);
  await atomicWriteFile(file, randomBytes(32).toString('base64url') + '\n', 0o600);
  return file;
}

interface UpFlags { model?: string; pull?: boolean; shards: number; routers: number; host: string; port: number; microBatches: number }

async function upCommand(flags: UpFlags): Promise<void> {
  const modelDir = flags.model ? await resolveModelDir(flags.model, { pull: flags.pull }) : checkpointDirOf(resolve(DEFAULT_RUN_DIR));
  if (flags.model && !existsSync(resolve(modelDir, 'config.json'))) throw new ConfigError(`--model ${flags.model}: no config.json there`);
  await prepareDefaultModel(modelDir);
  // A broken checkpoint or tokenizer is reported here, before any process starts.
  const { config } = await inspectModel(modelDir);
  await loadTokenizer(modelDir, config);
  const adminTokenFile = await writeAdminToken(resolve(UP_LOG_DIR));
  const cluster = new Cluster({
    checkpoint: modelDir, shards: flags.shards, routers: flags.routers, host: flags.host, port: flags.port, microBatches: flags.microBatches,
    logDir: resolve(UP_LOG_DIR), log: (line) => process.stderr.write(line + '\n'), adminTokenFile,
  });
  const stopped = untilStopped().then(() => cluster.stop());
  try {
    await cluster.up();
  } catch (err) {
    if (cluster.stopping) return; // Ctrl-C while starting
    await cluster.stop();
    throw err;
  }
  const api = cluster.routerUrls[0];
  const name = modelNameOf(modelDir);
  process.stdout.write([
    `switchyard cluster ready at ${api}: coordinator ${cluster.coordinatorAddress}, ${flags.shards} expert shard(s), ${flags.routers} router(s)`,
    `  API (OpenAI):          ${api}/v1/chat/completions   ${api}/v1/completions   ${api}/v1/models   ${api}/tokenize`,
    `  API (Open Inference):  ${api}/v2/models/${name}/infer   ${api}/v2/models/${name}/generate   ${api}/v2/health/ready`,
    `  live expert load:      ${api}/dashboard`,
    `  metrics (Prometheus):  ${api}/metrics   ${cluster.metricsUrls.join('   ')}`,
    `  processes:             ${Object.entries(cluster.pids()).map(([n, pid]) => `${n}=${pid}`).join(' ')} (logs in ${UP_LOG_DIR}/; a member that exits is restarted)`,
    `  placement:             switchyard placement show --admin ${cluster.adminUrl} --token-file ${relative(process.cwd(), adminTokenFile) || adminTokenFile}`,
    `  try: curl -s ${api}/v1/completions -H 'content-type: application/json' -d '{"prompt": "Call me Ishmael. ", "max_tokens": 80}'`,
    `       curl -s ${api}/v1/chat/completions -H 'content-type: application/json' -d '{"messages": [{"role": "user", "content": "Call me Ishmael."}], "max_tokens": 80}'`,
    '  Ctrl-C stops the cluster.',
    '',
  ].join('\n'));
  // A crash-looping member stops the cluster by itself (the reason is logged, the exit code is 1).
  await Promise.race([stopped, cluster.failed]);
}

interface ServeFlags {
  checkpoint?: string; pull?: boolean; experts: string; host: string; port: number; leaseTtlMs: number;
  coordinator?: string; shardId?: string; tokenBudget: number; modelName?: string; wireDtype: string;
  train?: boolean; trainRouters?: number; trainShards?: number; trainCheckpoint?: string;
  run?: string; index?: number; routers?: number; metricsPort: number;
  overflow: string; microBatches: number; microBatchMinRows: number; maxQueue: number; maxBatch: number; maxBatchedTokens: number; kvCacheTokens?: number; prefixCaching: boolean; skipTokenizer?: boolean; chatTemplate?: string; inferConcurrency: number; requestTimeoutMs: number; apiTokenFile?: string;
  maxRssMb: number; drainMs: number; advertise?: string;
  maxExperts: number; dropGraceMs: number; drainTimeoutMs: number; rebalanceIntervalMs: number; adminTokenFile?: string;
  maxMessageBytes: number; maxQueueRows: number; maxQueueBytes: number;
}

const WIRE_DTYPES: Record<string, FloatDtype> = { f32: 'F32', bf16: 'BF16', f16: 'F16' };

function wireDtypeOf(value: string): FloatDtype {
  const d = WIRE_DTYPES[value.toLowerCase()];
  if (!d) throw new ConfigError(`--wire-dtype ${value}: expected f32, bf16 or f16`);
  return d;
}

/**
 * The served model's name: --model-name, else ORG/NAME for a Hugging Face cache snapshot, else the
 * checkpoint folder's name (its parent's for `checkpoint`).
 */
function modelNameOf(dir: string, given?: string): string {
  if (given) return given;
  const hub = hubNameOfSnapshot(dir);
  if (hub) return hub;
  const name = basename(dir);
  return name === 'checkpoint' ? basename(dirname(dir)) : name;
}

async function serveRouter(flags: ServeFlags): Promise<void> {
  if (!flags.checkpoint) throw new ConfigError('serve router: --checkpoint DIR is required');
  if (!flags.coordinator) throw new ConfigError('serve router: --coordinator HOST:PORT is required');
  const dir = await resolveModelDir(flags.checkpoint, { pull: flags.pull, flag: '--checkpoint' });
  await startBackend('router');
  const overflow = flags.overflow as OverflowPolicy;
  if (!OVERFLOW_POLICIES.includes(overflow)) throw new ConfigError(`--overflow ${flags.overflow}: expected one of ${OVERFLOW_POLICIES.join(', ')}`);
  const apiToken = await readToken(flags.apiTokenFile, '--api-token-file', 'SWITCHYARD_API_TOKEN');
  const wireDtype = wireDtypeOf(flags.wireDtype);
  // Refused before any connection: a limit below one row of the model on the wire.
  checkMaxMessageBytes(flags.maxMessageBytes, (await inspectModel(dir)).config.hidden_size, wireDtype, '--max-message-bytes');
  const engine = await RouterEngine.load(dir, modelNameOf(dir, flags.modelName), {
    wireDtype, overflow, maxSequences: flags.maxBatch, maxWaiting: flags.maxQueue,
    maxBatchedTokens: flags.maxBatchedTokens, kvCacheTokens: flags.kvCacheTokens, prefixCaching: flags.prefixCaching,
    inferConcurrency: flags.inferConcurrency, inferQueue: flags.maxQueue, maxMessageBytes: flags.maxMessageBytes, microBatches: flags.microBatches, microBatchMinRows: flags.microBatchMinRows,
    skipTokenizer: flags.skipTokenizer, chatTemplate: flags.chatTemplate,
  });
  const link = new CoordinatorLink(flags.coordinator, { memberId: `router-${process.pid}`, role: 'ROLE_ROUTER' });
  link.heartbeatLoad = () => ({ expertLoads: engine.routing.expertLoads() }); // the planner's demand signal
  link.start();
  link.watch((table) => engine.setPlacement(table));
  const app = buildHttpApp(engine, {
    logLevel: process.env.SWITCHYARD_LOG ?? 'info', apiToken, requestTimeoutMs: flags.requestTimeoutMs, maxRssBytes: flags.maxRssMb * 2 ** 20,
  });
  const address = await app.listen({ host: flags.host, port: flags.port });
  process.stdout.write(`switchyard router listening on ${address.replace(/^http:\/\//, '')} serving '${engine.modelName}' (overflow policy ${overflow}${apiToken ? ', bearer token required' : ''}, chat template: ${engine.chatTemplate?.source ?? 'none, no tokenizer'})\n`);
  await untilStopped();
  // Graceful: stop accepting, let every admitted request finish, then leave.
  await app.close();
  await engine.drain();
  await link.leave();
  link.close();
  engine.close();
}


/**
 * Resolves on SIGTERM or SIGINT, or when the process that started this one is gone (if asked to). A
 * supervised service ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and its parent
 * stops the services in an order (routers, coordinator, shards) that keeps shards from draining.
 */
const untilStopped = (): Promise<void> => new Promise((resolveStop) => {
  process.once('SIGTERM', () => resolveStop());
  if (process.env[EXIT_WITH_PARENT_ENV] === '1') {
    process.on('SIGINT', () => {});
    whenParentGone(resolveStop);
  } else {
    process.once('SIGINT', () => resolveStop());
  }
});

/** JSON log lines on stderr (the supervisor keeps them in the run's logs/ folder). */
const jsonLog = (service: string) => (record: Record<string, unknown>) =>
  process.stderr.write(JSON.stringify({ time: new Date().toISOString(), service, ...record }) + '\n');

async function serveCoordinator(flags: ServeFlags): Promise<void> {
  const training = [flags.trainRouters, flags.trainShards, flags.trainCheckpoint];
  if (training.some((x) => x !== undefined) && training.some((x) => x === undefined))
    throw new ConfigError('serve coordinator: a training job needs all of --train-routers, --train-shards and --train-checkpoint');
  const adminToken = await readToken(flags.adminTokenFile, '--admin-token-file', 'SWITCHYARD_ADMIN_TOKEN');
  const coordinator = await startCoordinator(flags.host, flags.port, flags.leaseTtlMs, flags.trainCheckpoint === undefined ? undefined : {
    routers: flags.trainRouters!, shards: flags.trainShards!, checkpointDir: resolve(flags.trainCheckpoint), log: jsonLog('coordinator'),
  }, { intervalMs: flags.rebalanceIntervalMs, log: jsonLog('coordinator') });
  setBuildInfo(packageVersion(), 'none', 'coordinator');
  // One HTTP port: /metrics for scrapers, /admin/placement for operators (bearer token).
  const admin = buildAdminApp(coordinator.membership, coordinator.rebalancer, { token: adminToken });
  const adminAddress = await admin.listen({ host: flags.host, port: flags.metricsPort });
  const metricsPort = new URL(adminAddress).port;
  process.stdout.write(`switchyard coordinator listening on ${flags.host}:${coordinator.port} (metrics http://${flags.host}:${metricsPort}/metrics) placement admin http://${flags.host}:${metricsPort}/admin/placement${adminToken ? '' : ' (disabled: no admin token)'}\n`);
  await untilStopped();
  await coordinator.close();
  await admin.close();
}

/** `serve trainer`: one training router replica of a distributed run (started by `train --routers R`). */
async function serveTrainer(flags: ServeFlags): Promise<void> {
  if (!flags.run || !flags.coordinator || flags.index === undefined || !flags.routers)
    throw new ConfigError('serve trainer: --run DIR, --coordinator HOST:PORT, --index I and --routers R are required');
  if (flags.index >= flags.routers) throw new ConfigError(`serve trainer: --index ${flags.index} must be below --routers ${flags.routers}`);
  await startBackend('trainer');
  const runDir = resolve(flags.run);
  const run = JSON.parse(await readFile(resolve(runDir, RUN_FILE), 'utf8')) as RunFile;
  const memberId = `router-${flags.index}`;
  const link = new CoordinatorLink(flags.coordinator, { memberId, role: 'ROLE_ROUTER' });
  link.start();
  const trainLink = new TrainLink(flags.coordinator, memberId);
  const metrics = await startMetricsServer(flags.host, flags.metricsPort);
  process.stdout.write(`switchyard training router ${flags.index} of ${flags.routers} (metrics http://${flags.host}:${metrics.port}/metrics)\n`);
  try {
    const summary = await runRouterTraining({
      link: trainLink, index: flags.index, routers: flags.routers, model: parseModelConfig(run.model), train: parseTrainSettings(run.train),
      dataPath: run.data, outDir: runDir, log: jsonLog(memberId), microBatches: flags.microBatches,
    });
    jsonLog(memberId)({ msg: 'training finished', ...summary });
  } finally {
    trainLink.close();
    link.close();
    await metrics.close();
  }
}

async function serveCommand(service: string, flags: ServeFlags): Promise<void> {
  if (service === 'coordinator') return serveCoordinator(flags);
  if (service === 'router') return serveRouter(flags);
  if (service === 'trainer') return serveTrainer(flags);
  if (service !== 'expert') throw new ConfigError(`'serve ${service}': the services are expert, router, coordinator and trainer`);
  if (!flags.checkpoint) throw new ConfigError('serve expert: --checkpoint DIR is required');
  // Without a coordinator nothing would ever give this shard an expert.
  if (flags.experts.trim() === 'none' && !flags.coordinator) throw new ConfigError('--experts none needs --coordinator (the coordinator assigns the experts)');
  const dir = await resolveModelDir(flags.checkpoint, { pull: flags.pull, flag: '--checkpoint' });
  await startBackend('expert');
  const layout = await inspectModel(dir);
  const { config } = layout;
  const family = familyOf(config);
  const keys = parseAssignment(flags.experts, family.moeLayers, family.experts);
  if (flags.train && (!flags.coordinator || !flags.shardId)) throw new ConfigError('serve expert --train: --coordinator and --shard-id are required');
  // Routers may send any wire dtype, and replies use it: one float32 row must fit.
  checkMaxMessageBytes(flags.maxMessageBytes, config.hidden_size, 'F32', '--max-message-bytes');
  // A training shard loads its experts when the run (re)starts, from the checkpoint the coordinator names.
  const experts = flags.train ? new ExpertSet(config.hidden_size, family.expertIntermediate, family.expertActivation) : await loadExpertSet(layout, keys);
  const server = await startExpertServer(experts, flags.host, flags.port, { maxMessageBytes: flags.maxMessageBytes, maxQueueRows: flags.maxQueueRows, maxQueueBytes: flags.maxQueueBytes });
  // Peers dial the registered address, so a shard bound to 0.0.0.0 (a container) names its reachable one.
  const address = flags.advertise ?? `${flags.host}:${server.port}`;
  const memberId = flags.shardId ?? `shard-${address}`;
  // The shard enforces each router's share of its budget by the routers' own rule; it states its budget
  // itself (the table lists it only once registered). Without a coordinator it knows of one router.
  const creditsPerRouter = (routers?: number) => creditsPerExpert({ version: 0, routers, entries: [], shards: [{ shardId: memberId, address, tokenBudget: flags.tokenBudget }] }, memberId);
  server.shard.creditsPerRouter = creditsPerRouter();
  let training: Promise<void> | undefined;
  let trainLink: TrainLink | undefined;
  let stopping = false;
  if (flags.train) {
    trainLink = new TrainLink(flags.coordinator!, flags.shardId!);
    training = runShardTraining({
      link: trainLink, memberId: flags.shardId!, shard: server.shard, keys, log: jsonLog(flags.shardId!),
      onHoldings: (held) => void link?.reportHoldings(held),
    });
    training.catch((err: Error) => {
      // Asked to stop (SIGTERM closed the link): not a failure, and nothing left to wait for.
      if (stopping) {
        jsonLog(flags.shardId!)({ msg: 'training stopped' });
        process.exit(0);
      }
      jsonLog(flags.shardId!)({ msg: 'training failed', error: err.stack ?? err.message });
      process.exit(1);
    });
  }
  const metrics = await startMetricsServer(flags.host, flags.metricsPort);
  const link = flags.coordinator
    ? new CoordinatorLink(flags.coordinator, {
      memberId, role: 'ROLE_EXPERT_SHARD', address, experts: keys, tokenBudget: flags.tokenBudget, maxExperts: flags.maxExperts,
      model: { moeLayers: family.moeLayers, experts: family.experts },
    })
    : undefined;
  let follower: AssignmentFollower | undefined;
  if (link) {
    link.heartbeatLoad = () => ({ rowsPerSecond: server.shard.rowsPerSecond() });
    server.shard.registeredAt = () => link.registeredAt;
    link.start();
    // Training shards take their experts from the run's JOIN; serving shards follow the coordinator's plan.
    if (!flags.train) {
      follower = new AssignmentFollower({ shard: server.shard, memberId, checkpointDir: dir, link, dropGraceMs: flags.dropGraceMs, log: jsonLog(memberId) });
      link.watch((table) => {
        server.shard.creditsPerRouter = creditsPerRouter(table.routers);
        follower!.follow(table);
      });
    }
  }
  process.stdout.write(`switchyard expert shard listening on ${flags.host}:${server.port}${flags.advertise ? ` (registered as ${address})` : ''} holding ${keys.length} experts (metrics http://${flags.host}:${metrics.port}/metrics)\n`);
  await untilStopped();
  stopping = true;
  // Graceful: have the coordinator move our experts elsewhere and publish a placement without us, leave,
  // serve what is already on its way, then stop (open streams are cut after the drain; routers retry
  // their rows on other replicas).
  trainLink?.close();
  if (link && !flags.train) {
    const drained = await link.drain(flags.drainTimeoutMs);
    jsonLog(memberId)({ msg: drained.drained ? 'drained: experts are served elsewhere' : 'leaving without a drain', detail: drained.message });
  }
  await link?.leave();
  link?.close();
  follower?.close();
  await new Promise((r) => setTimeout(r, flags.drainMs));
  await server.close();
  await metrics.close();
  server.shard.experts.dispose();
}

export function buildProgram(): Command {
  const program = new Command('switchyard')
    .description('Mixture-of-Experts serving and training whose experts are independent services')
    .version(packageVersion());
  program.command('train').description('train a model: in one process, or distributed over router replicas and expert shards')
    .option('--config <name|file>', `preset (${PRESET_NAMES.join(', ')}) or JSON file {"base","model","train"}`, 'small')
    .option('--data <path>', 'UTF-8 text file or folder (default: Moby Dick)')
    .option('--steps <n>', 'training steps', integer('--steps', 1))
    .option('--seed <n>', 'random seed', integer('--seed'))
    .option('--out <dir>', 'run folder (checkpoint/, metrics.jsonl)', 'runs/train')
    .option('--shards <n>', 'expert shards', integer('--shards', 1), 1)
    .option('--routers <n>', 'router replicas', integer('--routers', 1), 1)
    .option('--single-process', 'the reference run: everything in this process')
    .option('--resume', 'continue from the run folder\'s checkpoint')
    .option('--micro-batches <n>', 'distributed: ping-pong micro-batches per router pass (1 = none); lanes hold whole routing groups (routing_group_tokens)', integer('--micro-batches', 1), DEFAULT_MICRO_BATCHES)
    .option('--replicate <L:E,...>', 'distributed: experts that get a replica on a second shard, e.g. 0:1,1:3')
    .option('--host <host>', 'distributed: address the local services listen on', '127.0.0.1')
    .action(trainCommand);
  program.command('generate').description('continue a prompt with a trained checkpoint')
    .requiredOption('--model <dir|ORG/NAME[@REV]>', 'checkpoint folder, or a Hugging Face model in the local cache (see pull)')
    .option('--pull', 'pull --model ORG/NAME from the Hub first')
    .option('--prompt <text>', 'prompt text', 'Call me Ishmael. ')
    .option('--max-tokens <n>', 'tokens to generate', integer('--max-tokens'), 200)
    .option('--temperature <t>', '0 = greedy', number('--temperature'), 0.8)
    .option('--top-p <p>', 'nucleus mass', number('--top-p'), 0.95)
    .option('--seed <n>', 'sampling seed (default: a fresh random one)', integer('--seed'))
    .action(generateCommand);
  program.command('up').description('the whole cluster on this machine (trains the default model first when there is none)')
    .option('--model <dir|ORG/NAME[@REV]>', 'checkpoint folder to serve instead of the default model, or a Hugging Face model in the local cache (see pull)')
    .option('--pull', 'pull --model ORG/NAME from the Hub first')
    .option('--shards <n>', 'expert shards', integer('--shards', 1), 2)
    .option('--routers <n>', 'routers (HTTP ports P, P+1, ...)', integer('--routers', 1), 1)
    .option('--host <host>', 'address every service listens on', '127.0.0.1')
    .option('--port <n>', 'HTTP port of the first router (0 = any free port)', integer('--port'), 8000)
    .option('--micro-batches <n>', 'routers: ping-pong micro-batches per model step (1 = none)', integer('--micro-batches', 1), DEFAULT_MICRO_BATCHES)
    .action(upCommand);
  program.command('prepare-model').description(`train the default model ('${DEFAULT_MODEL_CONFIG}', ${DEFAULT_MODEL_STEPS} steps) into a checkpoint folder unless one is there (what up does first; compose and the k8s Job call it)`)
    .option('--out <dir>', 'checkpoint folder to fill', checkpointDirOf(DEFAULT_RUN_DIR))
    .action(prepareModelCommand);
  program.command('placement').description('show, plan or apply the expert placement through the coordinator\'s admin endpoint')
    .argument('<action>', 'show | plan | apply')
    .requiredOption('--admin <url>', 'the coordinator\'s HTTP endpoint, e.g. http://127.0.0.1:9400')
    .option('--token-file <file>', 'bearer token of the admin endpoint (also SWITCHYARD_ADMIN_TOKEN)')
    .option('--json', 'print the endpoint\'s JSON answer')
    .action(placementCommand);
  program.command('health').description('ask a gRPC service (coordinator or expert shard) for its grpc.health.v1 status; exit 0 when SERVING (container health checks)')
    .argument('<host:port>', 'the service\'s gRPC address, e.g. 127.0.0.1:7100')
    .option('--timeout-ms <ms>', 'give up after this long', integer('--timeout-ms', 1), 2_000)
    .action(healthCommand);
  program.command('import').description('check a Hugging Face model folder from its config and headers (no tensor data) and print what serving it takes')
    .argument('<dir|ORG/NAME[@REV]>', 'model folder (config.json + model.safetensors or model-*-of-*.safetensors with model.safetensors.index.json), or a Hugging Face model in the local cache (see pull)')
    .option('--pull', 'pull ORG/NAME from the Hub first')
    .option('--shards <n>', 'expert shards to size (experts spread as spread:i/N)', integer('--shards', 1), 2)
    .option('--json', 'print the summary (or the problems) as JSON')
    .option('--backend <name>', `size memory for this compute backend (${BACKEND_CHOICES.join(', ')}; default: SWITCHYARD_BACKEND, else what this machine would pick)`)
    .action(async (dir: string, flags: ImportFlags & { pull?: boolean }) => {
      process.exitCode = await importCommand(await resolveModelDir(dir, { pull: flags.pull, flag: 'import' }), flags);
    });
  program.command('pull').description('download a model from the Hugging Face Hub (config, tokenizer, safetensors) into the Hugging Face cache; prints its snapshot folder')
    .argument('<ORG/NAME[@REVISION]>', 'model repository, at a branch, tag or commit (default main)')
    .option('--link <path>', 'then make PATH a symlink to the snapshot (e.g. /models/default, the folder compose and k8s serve); an existing link is replaced, a folder is not')
    .addHelpText('after', `\nEnvironment: HF_TOKEN (gated or private models), HF_ENDPOINT (default https://huggingface.co), HF_HUB_CACHE or HF_HOME (cache: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub).`)
    .action(pullCommand);
  program.command('bench').description('benchmarks: prints tables, writes bench-results/*.json')
    .argument('[suites...]', 'suites to run (default: all)')
    .option('--quick', 'short runs (under 2 minutes)')
    .action(async (suites: string[], flags: { quick?: boolean }) => {
      await startBackend();
      await runBench(suites, { quick: flags.quick === true });
    });
  program.command('serve').description('run one service, as a container runs it')
    .argument('<service>', 'expert | router | coordinator | trainer')
    .option('--checkpoint <dir|ORG/NAME[@REV]>', 'checkpoint folder to load from, or a Hugging Face model in the local cache (see pull)')
    .option('--pull', 'router, expert: pull --checkpoint ORG/NAME from the Hub first')
    .option('--experts <spec>', "experts to hold: 'all', 'none' (the coordinator assigns them), spread:I/N or LAYER:IDS groups, e.g. '0:0-3;1:0,2'", 'all')
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--port <n>', 'port (0 = any free port)', integer('--port'), 0)
    .option('--coordinator <host:port>', 'expert: register with this coordinator and keep the lease alive')
    .option('--advertise <host:port>', 'expert: address registered with the coordinator (default: --host:port; needed when --host is 0.0.0.0)')
    .option('--shard-id <id>', 'expert: member id at the coordinator (default: shard-<address>)')
    .option('--token-budget <rows>', 'expert: rows per expert accepted in flight (each router gets its share; more is refused with RESOURCE_EXHAUSTED)', integer('--token-budget', 1), 4096)
    .option('--max-queue-rows <rows>', 'expert: rows accepted and not answered yet, over all routers; a message past it is refused with RESOURCE_EXHAUSTED', integer('--max-queue-rows', 1), DEFAULT_MAX_QUEUE_ROWS)
    .option('--max-queue-bytes <bytes>', 'expert: the same bound in decoded float32 bytes of rows', integer('--max-queue-bytes', 1), DEFAULT_MAX_QUEUE_BYTES)
    .option('--model-name <name>', 'router: the served model name (default: from the checkpoint folder)')
    .option('--wire-dtype <f32|bf16|f16>', 'router: dtype of row batches on the wire (bf16/f16 halve the bytes)', 'f32')
    .option('--max-message-bytes <bytes>', 'router, expert: largest gRPC message between routers and shards; a router splits what it sends a shard to fit (give routers and shards the same value)', integer('--max-message-bytes', 1), MAX_MESSAGE_BYTES)
    .option('--lease-ttl-ms <ms>', 'coordinator: a member silent this long is removed', integer('--lease-ttl-ms', 1), 5000)
    .option('--train', 'expert: take part in the distributed training run of --coordinator')
    .option('--train-routers <n>', 'coordinator: router replicas of the training run it coordinates', integer('--train-routers', 1))
    .option('--train-shards <n>', 'coordinator: expert shards of the training run', integer('--train-shards', 1))
    .option('--train-checkpoint <dir>', 'coordinator: the training run\'s checkpoint folder (resumed from, committed into)')
    .option('--run <dir>', 'trainer: the run folder (train.json, metrics.jsonl, checkpoint/)')
    .option('--index <i>', 'trainer: this replica\'s index', integer('--index'))
    .option('--routers <n>', 'trainer: router replicas in the run', integer('--routers', 1))
    .option('--overflow <policy>', `router: rows that cannot reach their expert (${OVERFLOW_POLICIES.join(' | ')}; reject = 503)`, 'drop')
    .option('--micro-batches <n>', 'router, trainer: ping-pong micro-batches per model step (1 = none): the router computes one while the shards compute another', integer('--micro-batches', 1), DEFAULT_MICRO_BATCHES)
    .option('--micro-batch-min-rows <n>', 'router: split a step only when each micro-batch brings every expert this many rows on average (0 = always split)', integer('--micro-batch-min-rows', 0), DEFAULT_MIN_EXPERT_ROWS_PER_LANE)
    .option('--max-queue <n>', 'router: requests that may wait for a place before 503', integer('--max-queue', 0), 256)
    .option('--max-batch <n>', 'router: generations in one model step', integer('--max-batch', 1), 64)
    .option('--max-batched-tokens <n>', 'router: tokens in one model step (decodes first, then prompt chunks)', integer('--max-batched-tokens', 1), 2048)
    .option('--kv-cache-tokens <n>', 'router: tokens the paged KV cache holds (default: --max-batch sequences at full context, within a quarter of memory)', integer('--kv-cache-tokens', 1))
    .option('--no-prefix-caching', 'router: do not reuse the K/V of prompt blocks other requests computed')
    .option('--chat-template <file|template>', "router: the chat template of /v1/chat/completions instead of the checkpoint's (a Jinja file, or the template itself)")
    .option('--skip-tokenizer', 'router: load no tokenizer (a checkpoint without one): token-id prompts only, text endpoints answer 400')
    .option('--infer-concurrency <n>', 'router: Open Inference infer calls at once', integer('--infer-concurrency', 1), 4)
    .option('--request-timeout-ms <ms>', 'router: deadline of a request without an x-request-timeout-ms header', integer('--request-timeout-ms', 1), 30_000)
    .option('--api-token-file <file>', 'router: require Authorization: Bearer <token> (also SWITCHYARD_API_TOKEN)')
    .option('--max-rss-mb <mb>', 'router: answer 503 above this resident memory', integer('--max-rss-mb', 64), 3072)
    .option('--drain-ms <ms>', 'expert: after leaving the placement on SIGTERM, keep serving this long for rows already on their way', integer('--drain-ms'), 1_000)
    .option('--max-experts <n>', 'expert: most experts this shard may hold (its memory budget; 0 = no limit)', integer('--max-experts', 0), 0)
    .option('--drop-grace-ms <ms>', 'expert: keep an expert the placement moved away this long, for rows already on their way', integer('--drop-grace-ms', 0), 5_000)
    .option('--drain-timeout-ms <ms>', 'expert: on SIGTERM, wait this long for the coordinator to move the experts elsewhere', integer('--drain-timeout-ms', 0), 30_000)
    .option('--rebalance-interval-ms <ms>', 'coordinator: check the load balance this often and move experts when it pays (0 = only on join/drain/apply)', integer('--rebalance-interval-ms', 0), 30_000)
    .option('--admin-token-file <file>', 'coordinator: bearer token of the /admin/placement endpoint (also SWITCHYARD_ADMIN_TOKEN; unset: admin disabled)')
    .option('--metrics-port <n>', 'coordinator, expert, trainer: port of the Prometheus /metrics endpoint (0 = any free port)', integer('--metrics-port'), 0)
    .action(serveCommand);
  return program;
}

buildProgram().parseAsync(process.argv).catch((err: unknown) => {
  const e = err as Error;
  const known = ['ConfigError', 'CheckpointError', 'TokenizerError', 'CorpusError', 'SamplingError', 'RangeError', 'AssignmentError'].includes(e?.name);
  process.stderr.write(`switchyard: ${known ? e.message : e?.stack ?? String(err)}\n`);
  process.exitCode = known ? 2 : 1;
}).finally(() => {
  // wasm pthread workers keep the event loop alive; a finished command ends the process.
  if (process.env.SWITCHYARD_WASM_THREADS && Number(process.env.SWITCHYARD_WASM_THREADS) > 1) process.exit();
});
