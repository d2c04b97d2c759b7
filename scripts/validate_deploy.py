"""Validates the deployment files: every kustomization and the Helm chart
(linted, and rendered with each value set of its ci/ folder and its
defaults) checked against the Kubernetes schemas (strict), custom resources
against their CRDs' schemas (KEDA, cert-manager, Prometheus Operator),
yamllint, hadolint on the Dockerfiles, the checkov policy scan with zero
failures, the compose file against the Compose specification, the figures
the deployment guide requires, that the kustomize base is exactly what the
chart renders, that Tarantool's ConfigMap carries exactly the Lua the
services apply (the chart's too, through its links, packaged or not), the
alert rules (promtool check and unit tests, runbook links), the Grafana
dashboard and the KEDA ScaledObjects' queries. Exits non-zero on the first
problem set."""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/external-s3"]
CHART = "k8s/helm/minitoolstream"
K8S_VERSION = "1.29.0"
CHECKOV = os.environ.get("CHECKOV", "checkov")
PROMTOOL = os.environ.get("PROMTOOL", "promtool")
HELM = os.environ.get("HELM", "helm")
NODE = os.environ.get("NODE", "node")
# node_modules holding @kubernetes-models/{keda,cert-manager,prometheus-operator}.
CRD_MODELS = os.environ.get("CRD_MODELS", "")
RUNBOOK = "docs/runbook.md"
RUNBOOK_URL = "https://github.com/minitoolstream/minitoolstream/blob/main/" + RUNBOOK
problems = []


def run(*args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, **kwargs)


def render(path):
    # The Tarantool ConfigMap is generated from shared/storage/lua, outside k8s/.
    done = run("kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", path)
    if done.returncode != 0:
        problems.append(f"{path}: kustomize failed: {done.stderr.strip()[:2000]}")
        return None, []
    return done.stdout, [d for d in yaml.safe_load_all(done.stdout) if d]


def objects(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def check_schema(name, text, out_dir):
    path = out_dir / f"{name.replace('/', '_')}.yaml"
    path.write_text(text)
    done = run("kubernetes-validate", "--strict", "--quiet", "-k", K8S_VERSION, str(path))
    if done.returncode != 0:
        problems.append(f"{name}: kubernetes-validate --strict -k {K8S_VERSION}:\n{done.stdout}{done.stderr}")
    return path


def check_policies(targets):
    """checkov over every (name, path) at once: it takes seconds to start."""
    args = [a for _, path in targets for a in ("-f", str(path))]
    done = run(CHECKOV, *args, "--framework", "kubernetes", "-o", "json", "--compact")
    try:
        reports = json.loads(done.stdout)
    except json.JSONDecodeError:
        problems.append(f"checkov did not run: {done.stderr[-2000:]}")
        return
    names = {str(path): name for name, path in targets}
    counts = {name: {"passed": 0, "failed": 0, "skipped": 0} for name, _ in targets}
    for report in reports if isinstance(reports, list) else [reports]:
        for outcome, results in report.get("results", {}).items():
            if outcome == "parsing_errors":
                problems.extend(f"checkov cannot parse {path}" for path in results)
                continue
            for result in results:
                name = names.get(result.get("file_abs_path"), result.get("file_path"))
                counts.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})
                counts[name][outcome.removesuffix("_checks")] += 1
                if outcome == "failed_checks":
                    problems.append(f"{name}: checkov {result['check_id']} ({result['check_name']}) fails on {result['resource']}")
    for name, count in counts.items():
        if not count["passed"]:
            problems.append(f"{name}: checkov checked nothing")
        print(f"  {name}: checkov passed {count['passed']}, failed {count['failed']}, skipped {count['skipped']}")


def check_skip_reasons(name, docs):
    for doc in docs:
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip") and not re.fullmatch(r"CKV2?_K8S_\d+=\S.{10,}", value):
                problems.append(f"{name}: {doc['kind']}/{doc['metadata']['name']} skips a check without a reason: {value!r}")


def check_service_monitors(name, docs):
    services = [d for d in docs if d["kind"] == "Service"]
    for monitor in objects(docs, "ServiceMonitor").values():
        expressions = monitor["spec"]["selector"].get("matchExpressions", [])
        labels = monitor["spec"]["selector"].get("matchLabels", {})
        selected = [
            s for s in services
            if all(s["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())
            and all(s["metadata"].get("labels", {}).get(e["key"]) in e["values"] for e in expressions)
        ]
        if not selected:
            problems.append(f"{name}: ServiceMonitor {monitor['metadata']['name']} selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in selected:
                ports = {p.get("name") for p in service["spec"]["ports"]}
                if endpoint["port"] not in ports:
                    problems.append(f"{name}: Service {service['metadata']['name']} has no port named {endpoint['port']}")


def check_guide_figures(docs):
    """The deployment guide's numbers are requirements."""
    deployments = objects(docs, "Deployment")
    hpas = objects(docs, "HorizontalPodAutoscaler")
    pdbs = objects(docs, "PodDisruptionBudget")
    config = objects(docs, "ConfigMap")["minitoolstream-config"]["data"]
    grace = int(config["SHUTDOWN_GRACE_SECONDS"])
    for service, port in (("ingress", 50051), ("egress", 50052)):
        name = f"minitoolstream-{service}"
        deployment = deployments[name]
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        expect = {
            "replicas": (spec["replicas"], 3),
            "maxUnavailable": (spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0),
            "requests": (container["resources"]["requests"], {"cpu": "250m", "memory": "256Mi"}),
            "limits": (container["resources"]["limits"], {"cpu": "500m", "memory": "512Mi"}),
            "grpc port": (container["ports"][0]["containerPort"], port),
            "runAsUser": (pod["securityContext"]["runAsUser"], 1000),
            "runAsGroup": (pod["securityContext"]["runAsGroup"], 1000),
            "hpa min": (hpas[f"{name}-hpa"]["spec"]["minReplicas"], 3),
            "hpa max": (hpas[f"{name}-hpa"]["spec"]["maxReplicas"], 10),
            "hpa targets": (
                sorted((m["resource"]["name"], m["resource"]["target"]["averageUtilization"]) for m in hpas[f"{name}-hpa"]["spec"]["metrics"]),
                [("cpu", 70), ("memory", 80)],
            ),
            "pdb": (pdbs[f"{name}-pdb"]["spec"]["minAvailable"], 2),
        }
        for what, (got, want) in expect.items():
            if got != want:
                problems.append(f"{name}: {what} is {got!r}, the deployment guide requires {want!r}")
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        if pod["terminationGracePeriodSeconds"] <= pre_stop + grace:
            problems.append(f"{name}: terminationGracePeriodSeconds must exceed preStop ({pre_stop}) + drain ({grace})")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "grpc" not in container.get(probe, {}):
                problems.append(f"{name}: {probe} is not a native gRPC probe")
        security = container["securityContext"]
        if not (security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
                and security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
                and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"):
            problems.append(f"{name}: pod security settings are weaker than required")
    check_replica_set(docs, config)
    for key in ("TARANTOOL_ADDRESS", "TARANTOOL_USER", "MINIO_ENDPOINT", "MINIO_BUCKET_NAME", "LOG_LEVEL", "LOG_FORMAT"):
        if key not in config:
            problems.append(f"ConfigMap lacks {key}")
    secret = objects(docs, "Secret")["minitoolstream-secrets"]
    for key, value in secret["stringData"].items():
        if not value.startswith("change-me"):
            problems.append(f"Secret {key} holds something other than a placeholder")


def check_replica_set(docs, config):
    """Tarantool runs as a replica set of three that survives a node: one
    member per node, a quorum of two kept through disruptions, synchronous
    commits, election, and services that know every member."""
    tarantool = objects(docs, "StatefulSet")["tarantool"]
    spec = tarantool["spec"]
    pod = spec["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    members = [m for m in env.get("TARANTOOL_REPLICATION", "").split(",") if m]
    anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    pdb = objects(docs, "PodDisruptionBudget").get("tarantool-pdb", {}).get("spec", {})
    expect = {
        "replicas": (spec["replicas"], 3),
        "replication members": (len(members), 3),
        "synchro quorum": (env.get("TARANTOOL_SYNCHRO_QUORUM"), "2"),
        "election mode": (env.get("TARANTOOL_ELECTION_MODE"), "candidate"),
        "anti-affinity by node": ([a.get("topologyKey") for a in anti], ["kubernetes.io/hostname"]),
        "pdb minAvailable": (pdb.get("minAvailable"), 2),
        "services' members": (sorted(config["TARANTOOL_ADDRESS"].split(",")), sorted(members)),
        "readiness by role": ("mts_role" in str(pod["containers"][0].get("readinessProbe", {})), True),
    }
    for what, (got, want) in expect.items():
        if got != want:
            problems.append(f"tarantool: {what} is {got!r}, the replica set requires {want!r}")
    image = pod["containers"][0]["image"]
    version = tuple(int(x) for x in re.findall(r"\d+", image.split(":")[-1])[:2])
    if version < (2, 11):
        problems.append(f"tarantool: {image} has no election; the replica set needs 2.11 or later")


def github_anchor(heading):
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def check_alert_rules(name, docs, out_dir):
    """Every alert parses, passes its promtool unit tests, is tested at all,
    and links to a runbook section that exists."""
    rules = list(objects(docs, "PrometheusRule").values())
    if not rules:
        problems.append(f"{name}: no PrometheusRule")
        return
    groups = [group for rule in rules for group in rule["spec"]["groups"]]
    rules_dir = out_dir / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    tests = (ROOT / "monitoring/alerts.test.yaml").read_text()
    (rules_dir / "alerts.test.yaml").write_text(tests)
    for command in (["check", "rules", "rules.yml"], ["test", "rules", "alerts.test.yaml"]):
        done = subprocess.run([PROMTOOL, *command], cwd=rules_dir, capture_output=True, text=True)
        if done.returncode != 0:
            problems.append(f"{name}: promtool {' '.join(command)}:\n{done.stdout}{done.stderr}")
    runbook = (ROOT / RUNBOOK).read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in runbook.splitlines() if line.startswith("#")}
    tested = set(re.findall(r"alertname: (\S+)", tests))
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    for alert in alerts:
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{name}: alert {alert['alert']} has no {key}")
        url = annotations.get("runbook_url", "")
        base, _, anchor = url.partition("#")
        if base != RUNBOOK_URL or anchor not in anchors:
            problems.append(f"{name}: alert {alert['alert']}'s runbook_url {url!r} names no section of {RUNBOOK}")
        if alert["alert"] not in tested:
            problems.append(f"{name}: alert {alert['alert']} has no test in monitoring/alerts.test.yaml")
    print(f"  {name}: {len(alerts)} alerts checked and unit-tested with promtool")


DASHBOARD = "k8s/overlays/prod/dashboards/minitoolstream.json"


def check_dashboard_configmap(name, docs):
    """The dashboard ships unchanged, labelled for Grafana's sidecar."""
    text = (ROOT / DASHBOARD).read_text()
    shipped = objects(docs, "ConfigMap").get("minitoolstream-dashboard")
    if shipped is None or shipped["data"].get("minitoolstream.json") != text:
        problems.append(f"{name}: the minitoolstream-dashboard ConfigMap does not carry {DASHBOARD}")
    elif shipped["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
        problems.append(f"{name}: the dashboard ConfigMap lacks the grafana_dashboard label")


def check_dashboard(name, docs, out_dir):
    """The dashboard ships unchanged, and every query parses as PromQL."""
    check_dashboard_configmap(name, docs)
    text = (ROOT / DASHBOARD).read_text()
    dashboard = json.loads(text)
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    if not expressions:
        problems.append(f"{DASHBOARD}: no queries")
    # promtool parses expressions in rule files: each query becomes a
    # recording rule, Grafana's variables replaced by values.
    rules = [
        {"record": f"dashboard:query{i}",
         "expr": e.replace("$__rate_interval", "5m").replace("$namespace", ".*")}
        for i, e in enumerate(expressions)
    ]
    if not check_promql(DASHBOARD, rules, out_dir / "dashboard-queries.yml"):
        problems.append(f"{DASHBOARD}: a query does not parse")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    if f"./{pathlib.Path(DASHBOARD).parent}:/var/lib/grafana/dashboards:ro" not in mounts:
        problems.append("docker-compose.yml's Grafana does not load the shipped dashboard")
    print(f"  {name}: dashboard with {len(expressions)} queries checked")


LUA = ("init.lua", "minitoolstream.lua")


def check_tarantool_init(name, docs):
    """The tarantool-init ConfigMap carries shared/storage/lua as it is."""
    rendered = [cm for cm_name, cm in objects(docs, "ConfigMap").items() if cm_name.startswith("tarantool-init")]
    for lua in LUA:
        source = (ROOT / "shared/storage/lua" / lua).read_text()
        if len(rendered) != 1 or rendered[0]["data"].get(lua) != source:
            problems.append(f"{name}: the tarantool-init ConfigMap's {lua} is not shared/storage/lua/{lua}")


def check_one_schema_source():
    """Compose loads the Tarantool init and schema from shared/storage/lua,
    and k8s/ holds no copy of them: the chart's files are links to them."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["tarantool"]["volumes"]
    for lua in LUA:
        if f"./shared/storage/lua/{lua}:/opt/minitoolstream/{lua}:ro" not in mounts:
            problems.append(f"docker-compose.yml does not mount shared/storage/lua/{lua} into Tarantool")
    lua_dir = (ROOT / "shared/storage/lua").resolve()
    copies = [p for p in (ROOT / "k8s").rglob("*.lua") if not (p.is_symlink() and p.resolve().parent == lua_dir)]
    if copies:
        problems.append(f"Lua under k8s/ ({', '.join(map(str, copies))}): link to shared/storage/lua instead")
    for lua in LUA:
        link = ROOT / CHART / "files" / lua
        if not (link.is_symlink() and link.resolve() == lua_dir / lua):
            problems.append(f"{link.relative_to(ROOT)} is not a link to shared/storage/lua/{lua}")


def check_promql(name, rules, path):
    """promtool parses expressions in rule files: each query becomes a
    recording rule. True when every one parses."""
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    done = run(PROMTOOL, "check", "rules", str(path))
    if done.returncode != 0:
        problems.append(f"{name}: promtool check rules:\n{done.stdout}{done.stderr}")
    return done.returncode == 0


def check_yamllint(targets):
    """yamllint, with the repository's configuration, over rendered files."""
    done = run("yamllint", "-c", ".yamllint.yaml", "-s", *(str(path) for _, path in targets))
    if done.returncode != 0:
        names = {str(path): name for name, path in targets}
        for path, name in names.items():
            done.stdout = done.stdout.replace(path, name)
        problems.append(f"yamllint of rendered manifests:\n{done.stdout}{done.stderr}")


# Custom resources checked against their CRD's schema, by the validators
# @kubernetes-models generates from the CRDs: KEDA 2.10, cert-manager 1.11,
# Prometheus Operator 0.65.
CRD_SCHEMAS = {
    "keda.sh/v1alpha1/ScaledObject": ("@kubernetes-models/keda", "KedaShV1alpha1ScaledObject"),
    "keda.sh/v1alpha1/ScaledJob": ("@kubernetes-models/keda", "KedaShV1alpha1ScaledJob"),
    "keda.sh/v1alpha1/TriggerAuthentication": ("@kubernetes-models/keda", "KedaShV1alpha1TriggerAuthentication"),
    "cert-manager.io/v1/Certificate": ("@kubernetes-models/cert-manager", "CertManagerIoV1Certificate"),
    "cert-manager.io/v1/Issuer": ("@kubernetes-models/cert-manager", "CertManagerIoV1Issuer"),
    "monitoring.coreos.com/v1/ServiceMonitor": ("@kubernetes-models/prometheus-operator", "MonitoringCoreosComV1ServiceMonitor"),
    "monitoring.coreos.com/v1/PrometheusRule": ("@kubernetes-models/prometheus-operator", "MonitoringCoreosComV1PrometheusRule"),
}
# The generated validators accept fields the CRD does not declare (the API
# server would reject them, as kubectl's strict field validation does), so
# the script also records which fields the validator reads: a field of an
# object whose declared fields it read, and that it never read itself, is
# unknown to the schema. Objects it reads nothing of are free-form; objects
# whose keys it lists are maps.
CRD_VALIDATOR = r"""
const fs = require("fs");
const path = require("path");
const [schemas, input] = process.argv.slice(1).map((p) => JSON.parse(fs.readFileSync(p, "utf8")));
function track(value, at, seen) {
  if (value === null || typeof value !== "object") return value;
  const node = { read: new Set(), listed: false, at };
  seen.push([value, node]);
  const copy = Array.isArray(value)
    ? value.map((v, i) => track(v, `${at}/${i}`, seen))
    : Object.fromEntries(Object.entries(value).map(([k, v]) => [k, track(v, `${at}/${k}`, seen)]));
  return new Proxy(copy, {
    get(t, k, r) { if (typeof k === "string") node.read.add(k); return Reflect.get(t, k, r); },
    has(t, k) { if (typeof k === "string") node.read.add(k); return Reflect.has(t, k); },
    ownKeys(t) { node.listed = true; return Reflect.ownKeys(t); },
  });
}
const results = input.map((object) => {
  const key = `${object.apiVersion}/${object.kind}`;
  if (!schemas[key]) return [`no schema for ${key}`];
  const [pkg, schema] = schemas[key];
  const dir = path.dirname(require.resolve(`${pkg}/package.json`));
  const { validate } = require(path.join(dir, "_schemas", `${schema}.js`));
  const seen = [];
  if (!validate(track(object, "", seen))) {
    return validate.errors.map((e) => {
      const p = e.params;
      const what = e.keyword === "type" ? `must be ${p.type}`
        : e.keyword === "required" ? `must have ${p.missingProperty}`
        : e.keyword === "enum" ? `must be one of ${p.allowedValues.join(", ")}`
        : `fails ${e.keyword} ${JSON.stringify(p)}`;
      return `${e.instancePath || "/"}: ${what}`;
    });
  }
  const unknown = [];
  for (const [value, node] of seen) {
    if (Array.isArray(value) || node.listed || node.read.size === 0) continue;
    for (const k of Object.keys(value)) if (!node.read.has(k)) unknown.push(`${node.at}/${k}: unknown field`);
  }
  return unknown;
});
process.stdout.write(JSON.stringify(results));
"""


def is_custom(doc):
    group = doc["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def check_custom_resources(name, docs, out_dir):
    """Every custom resource against its CRD's schema (kubernetes-validate
    knows only Kubernetes' own kinds and skips them)."""
    custom = [d for d in docs if is_custom(d)]
    if not custom:
        return
    slug = re.sub(r"\W+", "_", name)
    (out_dir / f"{slug}.crd-schemas.json").write_text(json.dumps(CRD_SCHEMAS))
    (out_dir / f"{slug}.custom.json").write_text(json.dumps(custom))
    done = subprocess.run(
        [NODE, "-e", CRD_VALIDATOR, str(out_dir / f"{slug}.crd-schemas.json"), str(out_dir / f"{slug}.custom.json")],
        cwd=out_dir, capture_output=True, text=True, env={**os.environ, "NODE_PATH": CRD_MODELS},
    )
    try:
        results = json.loads(done.stdout)
    except json.JSONDecodeError:
        problems.append(f"{name}: the CRD schema check did not run: {done.stderr[-2000:]}")
        return
    for doc, errors in zip(custom, results):
        for error in errors:
            problems.append(f"{name}: {doc['kind']}/{doc['metadata']['name']} against its CRD: {error}")
    print(f"  {name}: {len(custom)} custom resources checked against their CRDs ({', '.join(sorted({d['kind'] for d in custom}))})")


def exported_metrics():
    """The names the services export (shared/runtime/src/metrics.rs)."""
    source = (ROOT / "shared/runtime/src/metrics.rs").read_text()
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', source).group(1)
    return {f"{prefix}_{n}" for n in re.findall(r'register\(\s*"(\w+)"', source)}


def check_scaled_objects(name, docs, out_dir, workloads=True):
    """Each ScaledObject scales a Deployment of the set (workloads=False: one
    outside it, a user's) that no other autoscaler scales, and each
    Prometheus trigger asks a PromQL query of metrics the services export,
    against a numeric threshold."""
    deployments = objects(docs, "Deployment")
    hpas = [h["spec"]["scaleTargetRef"] for h in objects(docs, "HorizontalPodAutoscaler").values()]
    exported = exported_metrics()
    queries = []
    for scaled in objects(docs, "ScaledObject").values():
        label = f"{name}: ScaledObject {scaled['metadata']['name']}"
        # A malformed one is the schema check's to report.
        target = scaled.get("spec", {}).get("scaleTargetRef", {})
        if target.get("kind", "Deployment") != "Deployment":
            problems.append(f"{label} scales a {target['kind']}, not a Deployment")
        if workloads and target.get("name") not in deployments:
            problems.append(f"{label} scales Deployment {target.get('name')}, which the set does not hold")
        if any(h.get("kind") == "Deployment" and h["name"] == target.get("name") for h in hpas):
            problems.append(f"{label}: Deployment {target['name']} also has an HPA (KEDA makes its own)")
        for trigger in scaled["spec"].get("triggers", []):
            if trigger.get("type") != "prometheus":
                continue
            metadata = trigger.get("metadata", {})
            for key in ("serverAddress", "query", "threshold"):
                if not metadata.get(key):
                    problems.append(f"{label}: a prometheus trigger lacks {key}")
            for key in ("threshold", "activationThreshold"):
                if key in metadata and not re.fullmatch(r"\d+(\.\d+)?", metadata[key]):
                    problems.append(f"{label}: {key} {metadata[key]!r} is not a number")
            query = metadata.get("query", "")
            queries.append({"record": f"scaledobject:query{len(queries)}", "expr": query})
            for metric in set(re.findall(r"\bminitoolstream_\w+", query)) - exported:
                problems.append(f"{label}: the services export no metric {metric}")
    slug = re.sub(r"\W+", "_", name)
    if queries and check_promql(name, queries, out_dir / f"{slug}.scaledobject-queries.yml"):
        print(f"  {name}: {len(queries)} ScaledObject queries parse and name exported metrics")


def check_certificates(name, docs):
    """A cert-manager Certificate fills the Secret the services mount for
    TLS and names each gRPC Service as clients in the namespace dial it."""
    for certificate in objects(docs, "Certificate").values():
        spec = certificate["spec"]
        label = f"{name}: Certificate {certificate['metadata']['name']}"
        for deployment in objects(docs, "Deployment").values():
            volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
            if volumes.get("tls", {}).get("secret", {}).get("secretName") != spec["secretName"]:
                problems.append(f"{label}: Deployment {deployment['metadata']['name']} does not mount {spec['secretName']}")
        for service in objects(docs, "Service").values():
            if any(p.get("name") == "grpc" for p in service["spec"]["ports"]):
                wanted = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
                if wanted not in spec.get("dnsNames", []):
                    problems.append(f"{label} does not name {wanted}")


def helm(*args):
    done = run(HELM, *args)
    # Helm notes each symlink it follows (the chart's Lua and dashboard).
    done.stderr = "\n".join(line for line in done.stderr.splitlines() if "found symbolic link" not in line)
    return done


def chart_value_sets():
    """The chart's defaults, then each value set of its ci/ folder."""
    return [("defaults", [])] + [
        (path.name.removesuffix("-values.yaml"), ["-f", str(path.relative_to(ROOT))])
        for path in sorted((ROOT / CHART / "ci").glob("*-values.yaml"))
    ]


def render_chart(label, values):
    done = helm("template", "minitoolstream", CHART, "--namespace", "minitoolstream", "--kube-version", K8S_VERSION, *values)
    if done.returncode != 0:
        problems.append(f"{label}: helm template failed: {done.stderr.strip()[:2000]}")
        return None, []
    return done.stdout, [d for d in yaml.safe_load_all(done.stdout) if d]


def check_chart_lint(label, values):
    done = helm("lint", "--strict", CHART, *values)
    if done.returncode != 0:
        problems.append(f"{label}: helm lint --strict:\n{done.stdout}{done.stderr}")


def check_chart_package(out_dir):
    """helm package carries the linked files' contents, not the links."""
    done = helm("package", CHART, "--destination", str(out_dir))
    if done.returncode != 0:
        problems.append(f"helm package {CHART}: {done.stderr.strip()[:2000]}")
        return
    linked = {f"files/{lua}": ROOT / "shared/storage/lua" / lua for lua in LUA}
    linked["files/minitoolstream-dashboard.json"] = ROOT / DASHBOARD
    with tarfile.open(next(out_dir.glob("minitoolstream-*.tgz"))) as package:
        members = {m.name.partition("/")[2]: m for m in package.getmembers()}
        for inside, source in linked.items():
            member = members.get(inside)
            if member is None or not member.isfile() or package.extractfile(member).read() != source.read_bytes():
                problems.append(f"the packaged chart's {inside} is not {source.relative_to(ROOT)}")
        if any(name.startswith("ci/") for name in members):
            problems.append("the packaged chart holds ci/ (.helmignore)")
    print(f"  {CHART}: packaged with {len(linked)} linked files carried whole")


def check_chart_only(label, docs):
    """What the chart alone adds: the Lua through its links, with a checksum
    that rolls Tarantool when it changes, and Helm's labels."""
    tarantool = objects(docs, "StatefulSet")["tarantool"]
    annotations = tarantool["spec"]["template"]["metadata"].get("annotations", {})
    lua = "".join((ROOT / "shared/storage/lua" / name).read_text() for name in LUA)
    if annotations.get("checksum/tarantool-init") != hashlib.sha256(lua.encode()).hexdigest():
        problems.append(f"{label}: Tarantool's pods lack the checksum of shared/storage/lua (a change would not roll them)")
    for doc in docs:
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "Helm":
            problems.append(f"{label}: {doc['kind']}/{doc['metadata']['name']} lacks Helm's labels")


GENERATED = "# Generated by scripts/render-base.sh"


def check_generated(out_dir):
    """The kustomize base and the prod overlay's monitoring objects are what
    the chart renders, with nothing of Helm's in them."""
    rendered = out_dir / "generated"
    done = run("bash", "scripts/render-base.sh", str(rendered))
    if done.returncode != 0:
        problems.append(f"scripts/render-base.sh failed: {done.stderr.strip()[-2000:]}")
        return
    count = 0
    for folder in ("k8s/base", "k8s/overlays/prod"):
        ours = {p.name: p.read_text() for p in (ROOT / folder).glob("*.yaml") if p.read_text().startswith(GENERATED)}
        theirs = {p.name: p.read_text() for p in (rendered / folder).glob("*.yaml")}
        for file in sorted(ours.keys() | theirs.keys()):
            if ours.get(file) != theirs.get(file):
                state = ("differs from what the chart renders" if file in ours and file in theirs
                         else "is missing (the chart renders it)" if file in theirs else "is no longer rendered by the chart")
                problems.append(f"{folder}/{file} {state}: run scripts/render-base.sh")
            count += 1
            for doc in yaml.safe_load_all(theirs.get(file, "")):
                meta = (doc or {}).get("metadata", {})
                for key, value in {**meta.get("labels", {}), **meta.get("annotations", {})}.items():
                    if key.startswith("helm.sh/") or value == "Helm":
                        problems.append(f"{folder}/{file}: {doc['kind']}/{meta['name']} carries Helm's {key}")
    kustomization = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    for path in (ROOT / "k8s/base").glob("*.yaml"):
        if path.read_text().startswith(GENERATED) and path.name not in kustomization["resources"]:
            problems.append(f"k8s/base/kustomization.yaml does not list the generated {path.name}")
    print(f"  {count} generated files are what the chart renders")


def yaml_sources():
    """The YAML files of the repository yamllint reads: the chart's
    templates are Go templates, linted once rendered."""
    templates = ROOT / CHART / "templates"
    files = [p for ext in ("yaml", "yml") for p in (ROOT / "k8s").rglob(f"*.{ext}") if templates not in p.parents]
    return sorted(str(p.relative_to(ROOT)) for p in files)


def main():
    done = run("yamllint", "-s", *yaml_sources(), "docker-compose.yml", "monitoring", ".yamllint.yaml")
    if done.returncode != 0:
        problems.append(f"yamllint:\n{done.stdout}{done.stderr}")
    done = run("hadolint", "ingress/Dockerfile", "egress/Dockerfile")
    if done.returncode != 0:
        problems.append(f"hadolint:\n{done.stdout}{done.stderr}")
    done = run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    if done.returncode != 0:
        problems.append(f"docker-compose.yml against the Compose specification:\n{done.stdout}{done.stderr}")
    check_one_schema_source()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp)
        policies = []
        scanned = []
        linted = []
        for path in KUSTOMIZATIONS:
            text, docs = render(path)
            if text is None:
                continue
            if path == "k8s/base":
                policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
            print(f"  {path}: {len(docs)} objects")
            scanned.append((path, check_schema(path, text, out_dir)))
            check_custom_resources(path, docs, out_dir)
            check_skip_reasons(path, docs)
            check_service_monitors(path, docs)
            if path == "k8s/overlays/prod":
                check_alert_rules(path, docs, out_dir)
                check_dashboard(path, docs, out_dir)
            if path == "k8s/base":
                check_guide_figures(docs)
                check_tarantool_init(path, docs)
        check_generated(out_dir)
        # The chart, with the same checks as the kustomizations (yamllint on
        # its output: its sources are templates).
        check_chart_package(out_dir)
        for value_set, values in chart_value_sets():
            label = f"{CHART} ({value_set})"
            check_chart_lint(label, values)
            text, docs = render_chart(label, values)
            if text is None:
                continue
            print(f"  {label}: {len(docs)} objects")
            path = check_schema(label, text, out_dir)
            scanned.append((label, path))
            linted.append((label, path))
            check_custom_resources(label, docs, out_dir)
            check_skip_reasons(label, docs)
            check_service_monitors(label, docs)
            check_scaled_objects(label, docs, out_dir)
            check_certificates(label, docs)
            check_chart_only(label, docs)
            if objects(docs, "ConfigMap").get("minitoolstream-dashboard"):
                check_dashboard_configmap(label, docs)
            if value_set == "defaults":
                check_guide_figures(docs)
                check_tarantool_init(label, docs)
        check_yamllint(linted)
        # Manifests applied by hand (the runbook's restore Job) and examples.
        for path in sorted((ROOT / "k8s/restore").glob("*.yaml")) + sorted((ROOT / "k8s/examples").glob("*.yaml")):
            name = str(path.relative_to(ROOT))
            text = path.read_text()
            docs = [d for d in yaml.safe_load_all(text) if d]
            print(f"  {name}: {len(docs)} objects")
            check_schema(name, text, out_dir)
            check_custom_resources(name, docs, out_dir)
            check_skip_reasons(name, docs)
            check_scaled_objects(name, docs, out_dir, workloads=False)
            if any(not is_custom(d) for d in docs):
                # Scanned with the base's network policies, which select its
                # pods in the cluster.
                with_policies = out_dir / f"{name.replace('/', '_')}.with-policies.yaml"
                with_policies.write_text(yaml.safe_dump_all(docs + policies))
                scanned.append((name, with_policies))
        check_policies(scanned)
    if problems:
        print("deployment validation failed:", file=sys.stderr)
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        sys.exit(1)
    print("deployment files valid")


if __name__ == "__main__":
    main()
