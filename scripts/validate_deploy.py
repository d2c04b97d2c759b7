"""Validates the deployment files: every kustomization rendered and checked
against the Kubernetes schemas (strict), yamllint, hadolint on the
Dockerfiles, the checkov policy scan
with zero failures, the compose file against the Compose specification, the
figures the deployment guide requires, that Tarantool's ConfigMap carries
exactly the Lua the services apply, the alert rules (promtool check and unit
tests, runbook links) and the Grafana dashboard. Exits non-zero on the first
problem set."""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/external-s3"]
K8S_VERSION = "1.29.0"
CHECKOV = os.environ.get("CHECKOV", "checkov")
PROMTOOL = os.environ.get("PROMTOOL", "promtool")
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


def check_policy(name, path):
    done = run(CHECKOV, "-f", str(path), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact")
    try:
        reports = json.loads(done.stdout)
    except json.JSONDecodeError:
        problems.append(f"{name}: checkov did not run: {done.stderr[-2000:]}")
        return
    for report in reports if isinstance(reports, list) else [reports]:
        for failed in report.get("results", {}).get("failed_checks", []):
            problems.append(f"{name}: checkov {failed['check_id']} ({failed['check_name']}) fails on {failed['resource']}")
        summary = report.get("summary", {})
        print(f"  {name}: checkov passed {summary.get('passed')}, failed {summary.get('failed')}, skipped {summary.get('skipped')}")


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


def check_dashboard(name, docs, out_dir):
    """The dashboard ships unchanged, and every query parses as PromQL."""
    text = (ROOT / DASHBOARD).read_text()
    shipped = objects(docs, "ConfigMap").get("minitoolstream-dashboard")
    if shipped is None or shipped["data"].get("minitoolstream.json") != text:
        problems.append(f"{name}: the minitoolstream-dashboard ConfigMap does not carry {DASHBOARD}")
    elif shipped["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
        problems.append(f"{name}: the dashboard ConfigMap lacks the grafana_dashboard label")
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
    path = out_dir / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run(PROMTOOL, "check", "rules", str(path))
    if done.returncode != 0:
        problems.append(f"{DASHBOARD}: a query does not parse:\n{done.stdout}{done.stderr}")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    if f"./{pathlib.Path(DASHBOARD).parent}:/var/lib/grafana/dashboards:ro" not in mounts:
        problems.append("docker-compose.yml's Grafana does not load the shipped dashboard")
    print(f"  {name}: dashboard with {len(expressions)} queries checked")


def check_one_schema_source(docs):
    """Kubernetes and compose load the Tarantool init and schema from shared/storage/lua."""
    init = objects(docs, "ConfigMap")
    rendered = [cm for name, cm in init.items() if name.startswith("tarantool-init")]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["tarantool"]["volumes"]
    for name in ("init.lua", "minitoolstream.lua"):
        source = (ROOT / "shared/storage/lua" / name).read_text()
        if len(rendered) != 1 or rendered[0]["data"].get(name) != source:
            problems.append(f"the tarantool-init ConfigMap's {name} is not shared/storage/lua/{name}")
        if f"./shared/storage/lua/{name}:/opt/minitoolstream/{name}:ro" not in mounts:
            problems.append(f"docker-compose.yml does not mount shared/storage/lua/{name} into Tarantool")
    copies = [p for p in (ROOT / "k8s").rglob("*.lua")]
    if copies:
        problems.append(f"Lua under k8s/ ({', '.join(map(str, copies))}): load shared/storage/lua instead")


def main():
    done = run("yamllint", "-s", "k8s", "docker-compose.yml", "monitoring", ".yamllint.yaml")
    if done.returncode != 0:
        problems.append(f"yamllint:\n{done.stdout}{done.stderr}")
    done = run("hadolint", "ingress/Dockerfile", "egress/Dockerfile")
    if done.returncode != 0:
        problems.append(f"hadolint:\n{done.stdout}{done.stderr}")
    done = run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    if done.returncode != 0:
        problems.append(f"docker-compose.yml against the Compose specification:\n{done.stdout}{done.stderr}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp)
        policies = []
        for path in KUSTOMIZATIONS:
            text, docs = render(path)
            if text is None:
                continue
            if path == "k8s/base":
                policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
            print(f"  {path}: {len(docs)} objects")
            rendered = check_schema(path, text, out_dir)
            check_policy(path, rendered)
            check_skip_reasons(path, docs)
            check_service_monitors(path, docs)
            if path == "k8s/overlays/prod":
                check_alert_rules(path, docs, out_dir)
                check_dashboard(path, docs, out_dir)
            if path == "k8s/base":
                check_guide_figures(docs)
                check_one_schema_source(docs)
        # Manifests applied by hand (the runbook's restore Job).
        for path in sorted((ROOT / "k8s/restore").glob("*.yaml")):
            name = str(path.relative_to(ROOT))
            text = path.read_text()
            docs = [d for d in yaml.safe_load_all(text) if d]
            print(f"  {name}: {len(docs)} objects")
            check_schema(name, text, out_dir)
            # Scanned with the base's network policies, which select its pods
            # in the cluster.
            scanned = out_dir / f"{name.replace('/', '_')}.with-policies.yaml"
            scanned.write_text(yaml.safe_dump_all(docs + policies))
            check_policy(name, scanned)
            check_skip_reasons(name, docs)
    if problems:
        print("deployment validation failed:", file=sys.stderr)
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        sys.exit(1)
    print("deployment files valid")


if __name__ == "__main__":
    main()
