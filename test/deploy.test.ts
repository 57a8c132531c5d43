// Deployment files, checked offline: the Kubernetes overlays render and every object validates against
// its schema (core kinds, KEDA, prometheus-operator), docker-compose.yml validates against the Compose
// specification, every command names a real `switchyard` subcommand and option, ports and health checks
// agree with the services' flags, the Dockerfiles copy only what exists, and the generated k8s files
// are up to date. No Docker engine or API server is needed; `kubectl kustomize` renders offline.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { Ajv } from 'ajv';
import { repoRoot } from './support/paths.js';
import { kubectlGate, kubectlTooOld, renderKustomization } from './support/kubectl.js';
import { parseAssignment } from '../services/expert/assignment.js';
import { preset } from '../services/core/config.js';
import { SHUTDOWN_GRACE_MS } from '../services/core/wire/server.js';

/** The model the compose stack trains and k8s/jobs/prepare-model writes. */
const DEFAULT_MODEL = preset('small').model;

const OVERLAYS = ['cpu', 'gpu'];
const NAMESPACE = 'switchyard';
const PORTS = { router: 8000, coordinator: 7000, expert: 7100, metrics: 9464 };
const CLI = join(repoRoot, 'dist', 'services', 'cli', 'main.js');

// ---------------------------------------------------------------------------------------------------
// The CLI's own description of its commands and options, read from its --help output (main.js parses
// argv when imported, so the program cannot be imported here).

function helpOf(...args: string[]): string {
  return execFileSync(process.execPath, [CLI, ...args, '--help'], { encoding: 'utf8' });
}

/** Option names at the start of a help line (two-space indent; wrapped descriptions are indented further). */
function optionsIn(help: string): Set<string> {
  return new Set([...help.matchAll(/^ {2}(?:-[a-zA-Z], )?(--[a-z0-9][a-z0-9-]*)/gm)].map((m) => m[1]));
}

interface CliSurface { commands: Set<string>; services: Set<string>; options: Map<string, Set<string>>; serveHelp: string }

let cliSurface: CliSurface | undefined;

function cli(): CliSurface {
  if (cliSurface) return cliSurface;
  const top = helpOf();
  const commands = new Set([...top.split('Commands:')[1].matchAll(/^ {2}([a-z][a-z-]*)/gm)].map((m) => m[1]));
  const serveHelp = helpOf('serve');
  const serviceLine = serveHelp.match(/^ {2}service\s+(.+)$/m);
  assert.ok(serviceLine, 'serve --help lists its services');
  const services = new Set(serviceLine[1].split('|').map((s) => s.trim()));
  const options = new Map<string, Set<string>>([['serve', optionsIn(serveHelp)], ...['train', 'prepare-model', 'pull'].map((c) => [c, optionsIn(helpOf(c))] as [string, Set<string>])]);
  cliSurface = { commands, services, options, serveHelp };
  return cliSurface;
}

/** Checks `args` (what follows `switchyard`) against the CLI; returns the flags as a map. */
function checkInvocation(args: string[], where: string): { command: string; service?: string; flags: Map<string, string> } {
  const surface = cli();
  const [command, service] = args;
  assert.ok(surface.commands.has(command), `${where}: 'switchyard ${command}' is not a command (${[...surface.commands].join(', ')})`);
  const known = surface.options.get(command);
  assert.ok(known, `${where}: no option list for '${command}'`);
  if (command === 'serve') assert.ok(surface.services.has(service), `${where}: 'serve ${service}' is not a service (${[...surface.services].join(', ')})`);
  const flags = new Map<string, string>();
  // serve takes its service, pull its ORG/NAME[@REVISION], before the options.
  for (let i = command === 'serve' || command === 'pull' ? 2 : 1; i < args.length; i++) {
    const arg = args[i];
    assert.ok(arg.startsWith('--'), `${where}: unexpected argument '${arg}' in ${args.join(' ')}`);
    assert.ok(known.has(arg), `${where}: '${arg}' is not an option of 'switchyard ${command}'`);
    const value = args[i + 1];
    if (value !== undefined && !value.startsWith('--')) {
      flags.set(arg, value);
      i++;
    } else flags.set(arg, '');
  }
  return { command, service: command === 'serve' ? service : undefined, flags };
}

/** A `serve` option's value in `flags`, or else its default as `serve --help` states it. */
function serveOption(flags: Map<string, string>, option: string): number {
  if (flags.has(option)) return Number(flags.get(option));
  const help = cli().serveHelp.replace(/\s+/g, ' ');
  const described = help.slice(help.indexOf(` ${option} `) + option.length + 1).split(/ --[a-z]/)[0];
  const fallback = described.match(/\(default: (\d+)\)/);
  assert.ok(fallback, `serve --help states no default for ${option}`);
  return Number(fallback[1]);
}

/**
 * Seconds a shard may take to stop after SIGTERM: the coordinator moves its experts (up to
 * --drain-timeout-ms), it serves rows on their way (--drain-ms), then its gRPC server cuts open streams.
 */
const expertStopSeconds = (flags: Map<string, string>) =>
  (serveOption(flags, '--drain-timeout-ms') + serveOption(flags, '--drain-ms') + SHUTDOWN_GRACE_MS) / 1000;

/** The address a container health check `["CMD", "node", <the CLI>, "health", ADDRESS]` asks. */
function grpcHealthCheckAddress(check: string[], where: string): string {
  const [form, node, main, command, address, ...rest] = check;
  assert.deepEqual([form, node, main, command], ['CMD', 'node', '/app/dist/services/cli/main.js', 'health'], `${where}: health check runs 'switchyard health' (${check.join(' ')})`);
  assert.ok(cli().commands.has(command), `${where}: 'switchyard ${command}' is a command`);
  assert.deepEqual(rest, [], `${where}: health check arguments`);
  return address;
}

/** The `switchyard ...` arguments inside a shell script that runs the CLI via node. */
function coversEveryExpert(specs: string[], where: string): void {
  const held = new Set<string>();
  for (const spec of specs)
    for (const { layer, expert } of parseAssignment(spec, DEFAULT_MODEL.num_hidden_layers, DEFAULT_MODEL.num_local_experts)) held.add(`${layer}/${expert}`);
  const total = DEFAULT_MODEL.num_hidden_layers * DEFAULT_MODEL.num_local_experts;
  assert.equal(held.size, total, `${where}: expert specs ${specs.join(' + ')} hold ${held.size} of the model's ${total} experts`);
}

// ---------------------------------------------------------------------------------------------------
// Kubernetes

type K8sObject = { apiVersion: string; kind: string; metadata: { name: string; namespace?: string; labels?: Record<string, string> }; spec?: any; data?: Record<string, string> };

const render = (dir: string) => renderKustomization<K8sObject>(dir);

test('the kubectl gate skips with a kubectl older than 1.27 and accepts newer ones', () => {
  const version = (major: string, minor: string) => JSON.stringify({ clientVersion: { major, minor, gitVersion: `v${major}.${minor.replace('+', '')}.0` } });
  // Debian's kubernetes-client: its kustomize v2 rejects the overlays' labels: and replacements:.
  assert.match(kubectlTooOld(version('1', '20'))!, /kubectl v1\.20\.0 is older than 1\.27/);
  assert.match(kubectlTooOld(version('1', '26+'))!, /older than 1\.27/);
  for (const [major, minor] of [['1', '27'], ['1', '32+'], ['2', '0']]) assert.equal(kubectlTooOld(version(major, minor)), undefined, `${major}.${minor}`);
});

/** The kubernetes-models class for an object's apiVersion and kind (each validates against its schema). */
async function modelClass(apiVersion: string, kind: string): Promise<new (data: unknown) => { validate(): void }> {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  const specifier =
    group === 'keda.sh' ? `@kubernetes-models/keda/keda.sh/${version}/${kind}`
      : group === 'monitoring.coreos.com' ? `@kubernetes-models/prometheus-operator/monitoring.coreos.com/${version}/${kind}`
        : group === '' ? `kubernetes-models/v1/${kind}`
          : `kubernetes-models/${group}/${version}/${kind}`;
  const module = await import(specifier).catch((err: Error) => assert.fail(`no schema for ${apiVersion} ${kind} (${specifier}): ${err.message}`));
  return module[kind];
}

const rendered = new Map<string, K8sObject[]>();
function overlay(name: string): K8sObject[] {
  if (!rendered.has(name)) rendered.set(name, render(`k8s/overlays/${name}`));
  return rendered.get(name)!;
}

const ofKind = (objects: K8sObject[], kind: string) => objects.filter((o) => o.kind === kind);
const byComponent = (objects: K8sObject[], kind: string, component: string) =>
  ofKind(objects, kind).filter((o) => o.metadata.labels?.['app.kubernetes.io/component'] === component);
const named = (objects: K8sObject[], kind: string, name: string) => {
  const found = objects.find((o) => o.kind === kind && o.metadata.name === name);
  assert.ok(found, `no ${kind} ${name}`);
  return found;
};

interface Container { name: string; image: string; args?: string[]; command?: string[]; env?: Array<{ name: string; value?: string; valueFrom?: { configMapKeyRef?: { name: string; key: string }; fieldRef?: { fieldPath: string } } }>;
  ports?: Array<{ name: string; containerPort: number }>; resources?: { limits?: Record<string, string | number> };
  readinessProbe?: Probe; livenessProbe?: Probe; startupProbe?: Probe; lifecycle?: { preStop?: { exec?: { command: string[] } } } }
interface Probe { httpGet?: { path: string; port: number | string }; grpc?: { port: number } }

const podSpec = (workload: K8sObject) => workload.spec.template.spec;
const mainContainer = (workload: K8sObject): Container => podSpec(workload).containers[0];

/** The value a container sees for $(NAME): a literal, or the key of a rendered ConfigMap. */
function envValue(objects: K8sObject[], container: Container, name: string): string {
  const env = container.env?.find((e) => e.name === name);
  assert.ok(env, `${container.name}: no env ${name}`);
  if (env.value !== undefined) return env.value;
  const ref = env.valueFrom?.configMapKeyRef;
  assert.ok(ref, `${container.name}: env ${name} is neither a value nor a ConfigMap key`);
  const value = named(objects, 'ConfigMap', ref.name).data?.[ref.key];
  assert.ok(value !== undefined, `${container.name}: ConfigMap ${ref.name} has no key ${ref.key}`);
  return value;
}

test('every overlay renders and every object validates against its schema', kubectlGate, async () => {
  for (const name of [...OVERLAYS.map((o) => `k8s/overlays/${o}`), 'k8s/jobs/prepare-model', 'k8s/jobs/pull-model']) {
    const objects = name.startsWith('k8s/overlays/') ? overlay(name.slice('k8s/overlays/'.length)) : render(name);
    assert.ok(objects.length > 0, `${name} renders nothing`);
    if (name === 'k8s/jobs/prepare-model') {
      const [job] = ofKind(objects, 'Job');
      const invocation = checkInvocation(job.spec.template.spec.containers[0].args, `${name}: Job`);
      assert.equal(invocation.command, 'prepare-model');
      assert.equal(invocation.flags.get('--out'), '/models/default', `${name}: fills the folder the services serve`);
    }
    if (name === 'k8s/jobs/pull-model') {
      const [job] = ofKind(objects, 'Job');
      const container = job.spec.template.spec.containers[0];
      const invocation = checkInvocation(container.args, `${name}: Job`);
      assert.equal(invocation.command, 'pull');
      assert.equal(invocation.flags.get('--link'), '/models/default', `${name}: links the folder the services serve`);
      const env = new Map<string, any>(container.env.map((e: { name: string }) => [e.name, e]));
      assert.match(env.get('SWITCHYARD_HUB_MODEL').value, /^[\w.-]+\/[\w.-]+(@.+)?$/);
      assert.equal(container.args[1], '$(SWITCHYARD_HUB_MODEL)');
      assert.ok(env.get('HF_HUB_CACHE').value.startsWith('/models/'), `${name}: the cache is on the checkpoints volume`);
      assert.deepEqual(env.get('HF_TOKEN').valueFrom.secretKeyRef, { name: 'switchyard-hf-token', key: 'HF_TOKEN', optional: true });
    }
    for (const object of objects) {
      const where = `${name}: ${object.kind} ${object.metadata?.name}`;
      const Model = await modelClass(object.apiVersion, object.kind);
      assert.doesNotThrow(() => new Model(object).validate(), where);
      assert.equal(object.metadata.namespace, NAMESPACE, `${where}: namespace`);
      assert.equal(object.metadata.labels?.['app.kubernetes.io/name'], 'switchyard', `${where}: app.kubernetes.io/name`);
      assert.equal(object.metadata.labels?.['app.kubernetes.io/part-of'], 'switchyard', `${where}: app.kubernetes.io/part-of`);
      assert.ok(object.metadata.labels?.['app.kubernetes.io/component'], `${where}: app.kubernetes.io/component`);
      // The base's placeholders (namespace="NAMESPACE", expert_group="GROUP", experts.GROUP) are all filled in.
      assert.doesNotMatch(JSON.stringify(object), /\b(NAMESPACE|GROUP)\b/, `${where}: a kustomize placeholder is left`);
      if (object.spec?.template) {
        const pod = object.spec.template;
        assert.equal(pod.metadata.labels['app.kubernetes.io/name'], 'switchyard', `${where}: pod template labels`);
        for (const c of [...(pod.spec.initContainers ?? []), ...pod.spec.containers]) {
          assert.match(c.image, /^registry\.example\.com\/switchyard(-gpu)?:0\.1\.0$/, `${where}: image of ${c.name} is set by the overlay`);
          assert.ok(c.resources?.requests && c.resources?.limits, `${where}: ${c.name} has requests and limits`);
          assert.equal(c.securityContext?.allowPrivilegeEscalation, false, `${where}: ${c.name} security context`);
        }
        assert.equal(pod.spec.securityContext?.runAsUser, 10001, `${where}: runs as the image's user`);
      }
    }
  }
});

test('services, probes, ports and commands agree with the CLI', kubectlGate, () => {
  for (const name of OVERLAYS) {
    const objects = overlay(name);
    const deployments = ofKind(objects, 'Deployment');
    assert.deepEqual([...new Set(deployments.map((d) => d.metadata.labels!['app.kubernetes.io/component']))].sort(), ['coordinator', 'expert', 'router']);
    for (const d of deployments) {
      const where = `${name}: Deployment ${d.metadata.name}`;
      const component = d.metadata.labels!['app.kubernetes.io/component'] as 'router' | 'coordinator' | 'expert';
      const c = mainContainer(d);
      const { service, flags } = checkInvocation(c.args!, where);
      assert.equal(service, component, `${where}: runs 'serve ${component}'`);
      const port = PORTS[component];
      assert.equal(flags.get('--port'), String(port), `${where}: --port`);
      assert.equal(flags.get('--host'), '0.0.0.0', `${where}: listens on every interface`);
      const portNames = new Map((c.ports ?? []).map((p) => [p.name, p.containerPort]));
      // Selectors pick exactly the pod template's labels.
      for (const [k, v] of Object.entries(d.spec.selector.matchLabels)) assert.equal(d.spec.template.metadata.labels[k], v, `${where}: selector ${k}`);
      if (component === 'router') {
        assert.equal(portNames.get('http'), port);
        assert.deepEqual(c.readinessProbe?.httpGet, { path: '/v2/health/ready', port });
        assert.deepEqual(c.livenessProbe?.httpGet, { path: '/v2/health/live', port });
        // The preStop sleep and the 30 s deadline of admitted requests fit in the grace period.
        const sleep = Number(c.lifecycle?.preStop?.exec?.command[1]);
        assert.ok(sleep > 0, `${where}: preStop sleep`);
        assert.ok(podSpec(d).terminationGracePeriodSeconds >= sleep + Number(flags.get('--request-timeout-ms') ?? 30_000) / 1000, `${where}: grace period`);
      } else {
        assert.equal(portNames.get('grpc'), port);
        assert.equal(portNames.get('metrics'), PORTS.metrics);
        assert.equal(flags.get('--metrics-port'), String(PORTS.metrics));
        for (const probe of [c.readinessProbe, c.livenessProbe]) assert.deepEqual(probe?.grpc, { port }, `${where}: gRPC health probe on ${port}`);
      }
      if (component === 'expert') {
        assert.equal(flags.get('--advertise'), `$(POD_IP):${port}`, `${where}: registers the pod IP`);
        assert.equal(flags.get('--shard-id'), '$(POD_NAME)');
        // What makes --advertise $(POD_IP):7100 an address routers can dial.
        assert.equal(c.env?.find((e) => e.name === 'POD_IP')?.valueFrom?.fieldRef?.fieldPath, 'status.podIP', `${where}: POD_IP is the pod's IP`);
        assert.ok(podSpec(d).terminationGracePeriodSeconds >= expertStopSeconds(flags), `${where}: the grace period covers the drain (${expertStopSeconds(flags)} s)`);
      }
      if (component !== 'coordinator') assert.equal(flags.get('--coordinator'), `switchyard-coordinator:${PORTS.coordinator}`, `${where}: --coordinator`);
    }
    // Every Service selects pods that exist and targets ports they declare.
    for (const svc of ofKind(objects, 'Service')) {
      const pods = deployments.filter((d) => Object.entries(svc.spec.selector).every(([k, v]) => d.spec.template.metadata.labels[k] === v));
      assert.ok(pods.length > 0, `${name}: Service ${svc.metadata.name} selects no pods`);
      for (const p of svc.spec.ports) for (const d of pods)
        assert.ok(mainContainer(d).ports?.some((cp) => cp.name === p.targetPort), `${name}: Service ${svc.metadata.name} port ${p.name} -> ${d.metadata.name}`);
    }
    const router = named(objects, 'Deployment', 'switchyard-router');
    const hpa = named(objects, 'HorizontalPodAutoscaler', 'switchyard-router');
    assert.equal(hpa.spec.scaleTargetRef.name, router.metadata.name);
    assert.equal(router.spec.replicas, undefined, 'the HPA owns the router count');
    // Routers: reachable on 8000 from anywhere; coordinator and shards only from Switchyard pods and Prometheus.
    const policies = ofKind(objects, 'NetworkPolicy');
    const routerPolicy = policies.find((p) => p.spec.podSelector.matchLabels['app.kubernetes.io/component'] === 'router');
    assert.ok(routerPolicy?.spec.ingress.some((r: { from?: unknown; ports: Array<{ port: number }> }) => !r.from && r.ports.some((p) => p.port === PORTS.router)));
    for (const component of ['coordinator', 'expert']) {
      const policy = policies.find((p) => p.spec.podSelector.matchLabels['app.kubernetes.io/component'] === component);
      assert.ok(policy, `${name}: NetworkPolicy for ${component}`);
      for (const rule of policy.spec.ingress) assert.ok(rule.from?.length > 0, `${name}: ${component} ingress is restricted`);
    }
  }
});

test('expert groups have distinct selectors, their own Service, PDB and ScaledObject on their queue depth', kubectlGate, () => {
  for (const name of OVERLAYS) {
    const objects = overlay(name);
    const groups = byComponent(objects, 'Deployment', 'expert');
    assert.ok(groups.length >= 2, `${name}: at least two expert groups`);
    const selectors = groups.map((g) => JSON.stringify(Object.entries(g.spec.selector.matchLabels).sort()));
    assert.equal(new Set(selectors).size, groups.length, `${name}: expert group selectors are distinct`);
    const specs: string[] = [];
    for (const g of groups) {
      const where = `${name}: ${g.metadata.name}`;
      const group = g.spec.selector.matchLabels['switchyard.dev/expert-group'];
      assert.ok(group, `${where}: selects by switchyard.dev/expert-group`);
      assert.deepEqual(g.spec.selector.matchLabels, { 'app.kubernetes.io/name': 'switchyard', 'app.kubernetes.io/component': 'expert', 'switchyard.dev/expert-group': group });
      assert.equal(g.spec.replicas, undefined, `${where}: KEDA owns the replica count`);
      const sameSelector = (o: K8sObject) => JSON.stringify(o.spec.selector.matchLabels ?? o.spec.selector) === JSON.stringify(g.spec.selector.matchLabels);
      const services = ofKind(objects, 'Service').filter((s) => JSON.stringify(s.spec.selector) === JSON.stringify(g.spec.selector.matchLabels));
      assert.equal(services.length, 1, `${where}: one Service of its own`);
      assert.equal(services[0].spec.clusterIP, 'None', `${where}: the Service is headless`);
      assert.equal(ofKind(objects, 'PodDisruptionBudget').filter(sameSelector).length, 1, `${where}: one PodDisruptionBudget of its own`);
      const scaled = ofKind(objects, 'ScaledObject').filter((s) => s.spec.scaleTargetRef.name === g.metadata.name);
      assert.equal(scaled.length, 1, `${where}: one ScaledObject targets it`);
      const so = scaled[0];
      assert.equal(so.spec.scaleTargetRef.kind ?? 'Deployment', 'Deployment');
      const trigger = so.spec.triggers[0];
      assert.equal(trigger.type, 'prometheus');
      const query: string = trigger.metadata.query;
      assert.match(query, /\bswitchyard_expert_queue_rows\b/, `${where}: scales on queue depth`);
      // An elastic group (pods start empty, the planner fills them) scales on every group's queue.
      const elastic = envValue(objects, mainContainer(g), 'SWITCHYARD_EXPERTS') === 'none';
      if (elastic) assert.ok(query.includes('expert_group=~".+"'), `${where}: an elastic group scales on the whole cluster's queue (${query})`);
      else assert.ok(query.includes(`expert_group="${group}"`), `${where}: the query counts its own group (${query})`);
      assert.ok(query.includes(`namespace="${NAMESPACE}"`), `${where}: the query counts its own namespace (${query})`);
      assert.ok(Number(trigger.metadata.threshold) > 0, `${where}: threshold`);
      // From zero pods, KEDA starts one as soon as the query exceeds activationThreshold (default 0).
      if (so.spec.minReplicaCount === 0) assert.ok(Number(trigger.metadata.activationThreshold) > 0, `${where}: wakes from zero only on a real backlog (activationThreshold)`);
      // A Prometheus outage must not drain a group: a fallback, if any, keeps pods.
      if (so.spec.fallback) assert.ok(so.spec.fallback.replicas > 0, `${where}: fallback keeps pods running`);
      if (!elastic) assert.ok(so.spec.minReplicaCount >= 2, `${where}: two replicas at least, so a drain keeps the group's experts served`);
      // A group that may have no pod is labelled optional, so SwitchyardExpertGroupDown does not count it as down.
      assert.equal(g.spec.template.metadata.labels['switchyard.dev/optional'] === 'true', so.spec.minReplicaCount === 0, `${where}: switchyard.dev/optional exactly when it may scale to zero`);
      const c = mainContainer(g);
      const spec = envValue(objects, c, 'SWITCHYARD_EXPERTS');
      assert.equal(checkInvocation(c.args!, where).flags.get('--experts'), '$(SWITCHYARD_EXPERTS)');
      specs.push(spec);
      if (name === 'gpu') {
        assert.match(c.image, /switchyard-gpu/, `${where}: GPU image`);
        assert.equal(Number(c.resources?.limits?.['nvidia.com/gpu']), 1, `${where}: one GPU per shard`);
        assert.equal(envValue(objects, c, 'SWITCHYARD_BACKEND'), 'tensorflow-gpu');
        assert.ok(podSpec(g).tolerations.some((t: { key: string }) => t.key === 'nvidia.com/gpu'), `${where}: tolerates GPU taints`);
        assert.equal(podSpec(g).nodeSelector['nvidia.com/gpu.present'], 'true');
      }
    }
    coversEveryExpert(specs, `${name} expert groups`);
    if (name === 'gpu')
      for (const d of [...byComponent(objects, 'Deployment', 'router'), ...byComponent(objects, 'Deployment', 'coordinator')])
        assert.doesNotMatch(mainContainer(d).image, /gpu/, `${d.metadata.name} stays on the CPU image`);
    // Prometheus labels shard metrics with the group, which the queries above select on.
    const monitor = named(objects, 'PodMonitor', 'switchyard');
    const relabelled = monitor.spec.podMetricsEndpoints.flatMap((e: { relabelings?: Array<{ sourceLabels: string[]; targetLabel: string }> }) => e.relabelings ?? []);
    assert.ok(relabelled.some((r: { sourceLabels: string[]; targetLabel: string }) =>
      r.targetLabel === 'expert_group' && r.sourceLabels.includes('__meta_kubernetes_pod_label_switchyard_dev_expert_group')));
    assert.ok(relabelled.some((r: { sourceLabels: string[]; targetLabel: string }) =>
      r.targetLabel === 'optional' && r.sourceLabels.includes('__meta_kubernetes_pod_label_switchyard_dev_optional')));
    assert.ok(ofKind(objects, 'PrometheusRule').length === 1, `${name}: the generated PrometheusRule`);
    assert.ok(ofKind(objects, 'ConfigMap').some((c) => c.metadata.labels?.grafana_dashboard === '1'), `${name}: the dashboards ConfigMap`);
  }
});

// ---------------------------------------------------------------------------------------------------
// docker-compose.yml

type ComposeService = Record<string, any>;

function compose(): { services: Record<string, ComposeService>; volumes: Record<string, unknown> } {
  // Merge keys (<<) as Compose resolves them.
  return parse(readFileSync(join(repoRoot, 'docker-compose.yml'), 'utf8'), { merge: true });
}

test('docker-compose.yml validates against the Compose specification', () => {
  // test/fixtures/compose-spec.json is the compose-spec project's schema/compose-spec.json (as shipped in
  // the dclint npm package). Its $schema names draft-07 by an https URL that ajv does not know.
  const { $schema: _, ...schema } = JSON.parse(readFileSync(join(repoRoot, 'test', 'fixtures', 'compose-spec.json'), 'utf8'));
  const validate = new Ajv({ strict: false, allErrors: true }).compile(schema);
  const valid = validate(compose());
  assert.ok(valid, JSON.stringify(validate.errors, null, 2));
});

test('compose services run real switchyard commands, on the ports their health checks use', () => {
  const { services, volumes } = compose();
  const switchyard = Object.entries(services).filter(([, s]) => s.build?.dockerfile?.startsWith('deploy/docker/'));
  assert.deepEqual(switchyard.map(([n]) => n).sort(), ['coordinator', 'expert-a', 'expert-b', 'expert-elastic', 'expert-gpu', 'model-init', 'router']);
  const experts: Array<[string, ReturnType<typeof checkInvocation>]> = [];
  for (const [name, s] of switchyard) {
    const where = `compose service ${name}`;
    assert.equal(s.entrypoint, undefined, `${where}: runs the image's switchyard entrypoint`);
    const invocations = [checkInvocation(s.command, where)];
    const healthTest: string = (s.healthcheck?.test ?? []).join(' ');
    const mounts: string[] = s.volumes ?? [];
    if (name === 'model-init') {
      assert.equal(invocations[0].command, 'prepare-model');
      assert.equal(invocations[0].flags.get('--out'), '/models/default', `${where}: fills the folder the services serve`);
      assert.ok(mounts.includes('checkpoints:/models'), `${where}: writes the checkpoints volume`);
      continue;
    }
    const { service, flags } = invocations[0];
    assert.equal(invocations.length, 1);
    const port = PORTS[service as keyof typeof PORTS];
    assert.equal(flags.get('--port'), String(port), `${where}: --port`);
    assert.equal(flags.get('--host'), '0.0.0.0', `${where}: listens on every interface`);
    if (service === 'router') {
      assert.match(healthTest, new RegExp(`127\\.0\\.0\\.1:${port}/v2/health/ready`), `${where}: health check`);
      assert.ok(s.ports.some((p: string) => p.endsWith(`:${port}`)), `${where}: publishes ${port}`);
    } else {
      // The address peers dial, which an mTLS certificate names.
      assert.equal(grpcHealthCheckAddress(s.healthcheck.test, where), `${name}:${port}`, `${where}: gRPC health check`);
      assert.equal(flags.get('--metrics-port'), String(PORTS.metrics), `${where}: --metrics-port`);
    }
    if (service !== 'coordinator') {
      assert.equal(flags.get('--coordinator'), `coordinator:${PORTS.coordinator}`, `${where}: --coordinator`);
      assert.equal(flags.get('--checkpoint'), '/models/default');
      assert.ok(mounts.includes('checkpoints:/models:ro'), `${where}: mounts the checkpoints read-only`);
      assert.equal(s.depends_on['model-init'].condition, 'service_completed_successfully');
      assert.equal(s.depends_on.coordinator.condition, 'service_healthy');
    }
    if (service === 'expert') {
      assert.equal(flags.get('--advertise'), `${name}:${port}`, `${where}: registers an address other containers can dial`);
      const stopGrace = /^(\d+)s$/.exec(s.stop_grace_period ?? '');
      assert.ok(stopGrace, `${where}: stop_grace_period in seconds`);
      assert.ok(Number(stopGrace[1]) >= expertStopSeconds(flags), `${where}: stop_grace_period covers the drain (${expertStopSeconds(flags)} s)`);
      experts.push([name, invocations[0]]);
    }
  }
  const shardIds = experts.map(([, inv]) => inv.flags.get('--shard-id'));
  assert.equal(new Set(shardIds).size, shardIds.length, 'shard ids are distinct');
  assert.deepEqual(experts.filter(([n]) => n === 'expert-a' || n === 'expert-b').map(([, inv]) => inv.flags.get('--experts')).sort(), ['spread:0/2', 'spread:1/2']);
  coversEveryExpert(experts.filter(([n]) => !services[n].profiles).map(([, inv]) => inv.flags.get('--experts')!), 'compose expert groups');
  // The router waits for every expert group that always runs (its readiness needs all experts placed).
  for (const [n] of experts.filter(([n]) => !services[n].profiles)) assert.equal(services.router.depends_on[n]?.condition, 'service_healthy', `router waits for ${n}`);
  const gpu = services['expert-gpu'];
  assert.deepEqual(gpu.profiles, ['gpu']);
  assert.match(gpu.build.dockerfile, /Dockerfile\.gpu$/);
  assert.ok(gpu.deploy.resources.reservations.devices.some((d: { capabilities: string[] }) => d.capabilities.includes('gpu')), 'expert-gpu reserves a GPU');
  assert.ok('checkpoints' in volumes);
  // Prometheus and Grafana read their configuration from deploy/ (written alongside the rules).
  assert.match(services.prometheus.image, /^prom\/prometheus:/);
  assert.ok(services.prometheus.command.includes('--config.file=/etc/prometheus/prometheus.yml'));
  assert.ok(services.prometheus.volumes.includes('./deploy/prometheus:/etc/prometheus:ro'));
  assert.match(services.grafana.image, /^grafana\/grafana:/);
  assert.ok(services.grafana.volumes.includes('./deploy/grafana/provisioning:/etc/grafana/provisioning:ro'));
  assert.ok(services.grafana.volumes.includes('./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro'));
  assert.ok(services.grafana.ports.some((p: string) => p.endsWith(':3000')));
});

test('docker-compose.hub.yml turns model-init into a pull of $HF_MODEL linked at /models/default', () => {
  const hub = parse(readFileSync(join(repoRoot, 'docker-compose.hub.yml'), 'utf8'));
  assert.deepEqual(Object.keys(hub.services), ['model-init'], 'it only changes the one-shot service the others wait for');
  const init = hub.services['model-init'];
  const invocation = checkInvocation(init.command, 'docker-compose.hub.yml model-init');
  assert.equal(invocation.command, 'pull');
  assert.match(init.command[1], /^\$\{HF_MODEL:\?/);
  assert.equal(invocation.flags.get('--link'), '/models/default');
  assert.ok(init.environment.HF_HUB_CACHE.startsWith('/models/'), 'the cache is on the checkpoints volume');
  assert.equal(init.environment.HF_TOKEN, '${HF_TOKEN:-}');
});

test('the compose Prometheus scrapes every compose service with metrics, on its metrics port', () => {
  const { services } = compose();
  const config = parse(readFileSync(join(repoRoot, 'deploy', 'prometheus', 'prometheus.yml'), 'utf8'));
  const groups: Array<{ targets: string[]; labels?: Record<string, string> }> =
    config.scrape_configs.flatMap((job: { static_configs?: Array<{ targets: string[]; labels?: Record<string, string> }> }) => job.static_configs ?? []);
  const scraped = new Set<string>();
  for (const { targets, labels } of groups) for (const target of targets) {
    const [host, port] = target.split(':');
    const s = services[host];
    assert.ok(s, `scrape target ${target}: no compose service '${host}'`);
    const { service, flags } = checkInvocation(s.command, `compose service ${host}`);
    // Routers serve /metrics on their HTTP port; the other services on --metrics-port.
    assert.equal(port, flags.get(service === 'router' ? '--port' : '--metrics-port'), `scrape target ${target}`);
    // A profile's service is down unless its profile runs: SwitchyardExpertGroupDown leaves optional targets out.
    assert.equal(labels?.optional === 'true', Boolean(s.profiles), `scrape target ${target}: optional="true" exactly when the service is in a profile`);
    scraped.add(host);
  }
  for (const [name, s] of Object.entries(services)) {
    if (!Array.isArray(s.command) || !s.command.includes('--metrics-port')) continue;
    assert.ok(scraped.has(name), `compose service ${name} serves /metrics (--metrics-port) but is no scrape target`);
  }
  assert.ok(scraped.has('router'), 'the router is scraped');
});

// ---------------------------------------------------------------------------------------------------
// Dockerfiles

interface Instruction { op: string; args: string }

function instructions(path: string): Instruction[] {
  const lines = readFileSync(path, 'utf8').split('\n').filter((l) => !/^\s*#/.test(l));
  const joined = lines.join('\n').replace(/\\\n/g, ' ');
  return joined.split('\n').map((l) => l.trim()).filter(Boolean).map((l) => {
    const [op, ...rest] = l.split(/\s+/);
    return { op: op.toUpperCase(), args: rest.join(' ') };
  });
}

/** Top-level names .dockerignore keeps out of the build context. */
function dockerIgnored(): string[] {
  return readFileSync(join(repoRoot, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
}

for (const dockerfile of ['Dockerfile', 'Dockerfile.gpu']) {
  test(`deploy/docker/${dockerfile} copies only what exists or its build stage produces`, () => {
    const steps = instructions(join(repoRoot, 'deploy', 'docker', dockerfile));
    const ignored = dockerIgnored();
    // Per stage: its name, its WORKDIR, the context paths copied into it and what its RUN steps produce.
    const stages = new Map<string, { workdir: string; copied: Set<string>; runs: string[]; external: boolean }>();
    let current: { workdir: string; copied: Set<string>; runs: string[]; external: boolean } | undefined;
    for (const { op, args } of steps) {
      if (op === 'FROM') {
        const [image, as, name] = args.split(/\s+/);
        const base = stages.get(image);
        current = { workdir: base?.workdir ?? '/', copied: new Set(base?.copied), runs: [...(base?.runs ?? [])], external: !base };
        assert.equal(as?.toUpperCase(), 'AS', `${dockerfile}: every stage is named (${args})`);
        stages.set(name, current);
      } else if (op === 'WORKDIR') current!.workdir = args;
      else if (op === 'RUN') current!.runs.push(args);
      else if (op === 'COPY' || op === 'ADD') {
        const words = args.split(/\s+/);
        const from = words.find((w) => w.startsWith('--from='))?.slice('--from='.length);
        const paths = words.filter((w) => !w.startsWith('--'));
        const sources = paths.slice(0, -1);
        for (const source of sources) {
          if (from === undefined) {
            assert.ok(existsSync(join(repoRoot, source)), `${dockerfile}: COPY ${source}: not in the repository`);
            assert.ok(!ignored.includes(source.split('/')[0]), `${dockerfile}: COPY ${source}: excluded by .dockerignore`);
            current!.copied.add(source.split('/')[0]);
            continue;
          }
          const stage = stages.get(from);
          assert.ok(stage, `${dockerfile}: COPY --from=${from}: no such stage`);
          if (stage.external) continue; // an official image's own files (node, npm)
          assert.ok(source.startsWith(stage.workdir + '/'), `${dockerfile}: COPY --from=${from} ${source}: outside the stage's WORKDIR ${stage.workdir}`);
          const path = source.slice(stage.workdir.length + 1);
          const top = path.split('/')[0];
          const producedBy: Record<string, RegExp> = { dist: /\bnpm run build\b/, node_modules: /\bnpm ci\b/ };
          if (producedBy[top]) assert.ok(stage.runs.some((r) => producedBy[top].test(r)), `${dockerfile}: ${from} stage never produces ${top}/`);
          else assert.ok(stage.copied.has(top), `${dockerfile}: ${source} was never copied into stage ${from}`);
          // What the build produces exists after `npm run build` here too.
          assert.ok(existsSync(join(repoRoot, path)), `${dockerfile}: ${path} does not exist after the build`);
        }
      }
    }
    const last = (op: string) => [...steps].reverse().find((s) => s.op === op)?.args;
    assert.deepEqual(JSON.parse(last('ENTRYPOINT')!), ['node', '/app/dist/services/cli/main.js']);
    assert.ok(existsSync(CLI), 'dist/services/cli/main.js exists after npm run build');
    assert.equal(last('USER'), '10001:10001', `${dockerfile}: runs as the non-root uid 10001`);
    assert.ok(last('HEALTHCHECK'), `${dockerfile}: has a HEALTHCHECK`);
    const { service, flags } = checkInvocation(JSON.parse(last('CMD')!), `${dockerfile} CMD`);
    const healthcheck = last('HEALTHCHECK')!;
    assert.ok(healthcheck.includes(`127.0.0.1:${flags.get('--port')}`), `${dockerfile}: HEALTHCHECK checks the default command's port`);
    if (service !== 'router') {
      const check = JSON.parse(healthcheck.slice(healthcheck.indexOf('CMD ') + 'CMD '.length));
      assert.equal(grpcHealthCheckAddress(['CMD', ...check], `${dockerfile} HEALTHCHECK`), `127.0.0.1:${flags.get('--port')}`);
    }
    const env = steps.filter((s) => s.op === 'ENV').map((s) => s.args).join(' ');
    if (dockerfile === 'Dockerfile') {
      assert.equal(service, 'router');
      assert.match(env, /SWITCHYARD_BACKEND=wasm/);
    } else {
      assert.equal(service, 'expert');
      assert.match(env, /SWITCHYARD_BACKEND=tensorflow-gpu/);
      assert.ok(steps.some((s) => s.op === 'RUN' && s.args.includes('@tensorflow/tfjs-node-gpu')), 'installs tfjs-node-gpu');
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Generated files

test('k8s/base/generated is up to date with deploy/prometheus and deploy/grafana', () => {
  try {
    execFileSync(process.execPath, [join(repoRoot, 'k8s', 'generate.mjs'), '--check'], { encoding: 'utf8', stdio: 'pipe' });
  } catch (err) {
    assert.fail(`node k8s/generate.mjs --check failed: ${(err as { stderr?: string }).stderr ?? (err as Error).message}`);
  }
});
