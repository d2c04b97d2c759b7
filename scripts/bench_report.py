"""Turns the JSON lines of scripts/bench.sh into a Markdown report: one
table per scenario and the ratios the performance goals are stated in."""

import json
import os
import sys


def machine():
    cpuinfo = open("/proc/cpuinfo").read()
    cores = cpuinfo.count("processor\t:")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{cores} cores ({model}), {mem / 1024 / 1024:.0f} GiB RAM, {os.uname().sysname} {os.uname().release}"


def processes(figures):
    busy = {name: f for name, f in figures.items()
            if f["cpu_seconds"] > 0.05 or name in ("ingress", "egress", "client")}
    return ", ".join(f"{name} {f['peak_rss_mib']} MiB/{f['cpu_seconds']} s" for name, f in busy.items())


def failures(runs):
    """What makes a smoke run fail: a scenario that moved nothing, errors of
    ours, unverified payloads. Errors of a peer or a reference that still
    moved messages are its own (Garage has stalled a PutObject for 30 s
    here) and are only warned about."""
    found, warnings = ([] if runs else ["no scenario ran"]), []
    for r in runs:
        name = f"{r['scenario']} {r.get('system', '')}".strip()
        if r["scenario"] in ("5-large-payloads", "7-capacity"):
            if not r.get("verified"):
                found.append(f"{name}: payloads not verified")
        elif not r["msg_per_s"]:
            found.append(f"{name}: no messages")
        elif r["errors"]:
            ours = r["system"].startswith("minitoolstream")
            (found if ours else warnings).append(f"{name}: {r['errors']} errors")
    return found, warnings


def main(path, smoke=False):
    runs = [json.loads(line) for line in open(path) if line.strip()]
    if smoke:
        print("Smoke run on unoptimised builds: it checks the harness; its figures mean nothing.\n")
    print(f"Machine: {machine()}. Results: `{path}`.\n")
    print("| scenario | system | configuration | msg/s | MB/s | p50 ms | p90 ms | p99 ms | max ms | errors | peak RSS / CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["scenario"] in ("5-large-payloads", "7-capacity"):
            continue
        lat = r["latency_ms"]
        config = ", ".join(f"{k} {v}" for k, v in r["config"].items())
        print(f"| {r['scenario']} | {r['system']} | {config} | {r['msg_per_s']} | {r['mb_per_s']} | {lat['p50']} | "
              f"{lat['p90']} | {lat['p99']} | {lat['max']} | {r['errors']} | {processes(r['processes'])} |")
    large = [r for r in runs if r["scenario"] == "5-large-payloads"]
    if large:
        print("\n| 5-large-payloads | system | MiB × concurrency | phase | MiB/s | peak RSS / CPU |")
        print("|---|---|---|---|---|---|")
        for r in large:
            for phase in ("publish", "download"):
                p = r[phase]
                print(f"| | {r.get('system', 'minitoolstream')} | {r['payload_mib']} × {r['concurrency']} | {phase} | "
                      f"{p['mib_per_s']} | {processes(p['processes'])} |")

    for r in (r for r in runs if r["scenario"] == "7-capacity"):
        print(f"\n7-capacity: {r['published']} × {r['config']['size']} B published in {r['publish_seconds']} s "
              f"({r['publish_msg_per_s']} msg/s, {r['refused_and_retried']} refused for room and sent again); "
              f"Tarantool RSS (MiB) while publishing: {r['tarantool_rss_mib_samples']}, after: "
              f"{r['tarantool_rss_mib_after']}; replayed {r['replayed']} from sequence 1 in {r['replay_seconds']} s "
              f"({r['replay_msg_per_s']} msg/s on a Consume stream, goal ≥ 100000; "
              f"{r.get('fetch_replay_msg_per_s', '-')} msg/s with Fetch and Ack), verified: {r['verified']}")

    def find(scenario, system):
        return next((r for r in runs if r["scenario"] == scenario and r["system"] == system), None)

    print("\nGoals:\n")
    peer = find("1-publish", "jetstream")
    for system, api in (("minitoolstream", "unary Publish"), ("minitoolstream-publishmany", "PublishMany stream")):
        ours = find("1-publish", system)
        if ours and peer and peer["msg_per_s"]:
            print(f"- Scenario 1, publish 1 KiB × 64, {api}: ours/JetStream = "
                  f"{ours['msg_per_s'] / peer['msg_per_s']:.2f} (goal ≥ 1.0)")
    ours = max((r for r in runs if r["scenario"] == "1-publish" and r["system"].startswith("minitoolstream")),
               key=lambda r: r["msg_per_s"], default=None)
    raw = find("1-publish", "tarantool-raw")
    if ours and raw and raw["msg_per_s"]:
        print(f"- Scenario 1: ours (best)/raw Tarantool group commit = {ours['msg_per_s'] / raw['msg_per_s']:.2f} "
              "(the metadata path's ceiling)")
    peer = find("2-delivery", "jetstream")
    for system, api in (("minitoolstream", "unary Publish"), ("minitoolstream-publishmany", "PublishMany stream")):
        ours = find("2-delivery", system)
        if ours:
            line = f"- Scenario 2, publish → delivery p99, {api}: ours {ours['latency_ms']['p99']} ms (goal ≤ 5 ms)"
            if peer:
                line += f", JetStream {peer['latency_ms']['p99']} ms"
            print(line)
    ours, raw = find("3-large-publish", "minitoolstream"), find("3-large-publish", "s3-raw")
    if ours and raw and raw["mb_per_s"]:
        print(f"- Scenario 3, large publish: ours/raw S3 = {ours['mb_per_s'] / raw['mb_per_s']:.2f} (goal ≥ 0.8)")
    peer = find("3-large-publish", "nats-object-store")
    if ours and peer and peer["mb_per_s"]:
        print(f"- Scenario 3, large publish: ours {ours['mb_per_s']} MB/s, NATS Object Store {peer['mb_per_s']} MB/s, "
              f"ratio {ours['mb_per_s'] / peer['mb_per_s']:.2f}")
    fan = find("4-fanout", "minitoolstream")
    if fan:
        print(f"- Scenario 4, fan-out {fan['config']['streams']} streams: notification p99 {fan['latency_ms']['p99']} ms "
              f"(goal ≤ 100 ms), egress peak RSS {fan['processes'].get('egress', {}).get('peak_rss_mib')} MiB (goal ≤ 256)")
    ours, peer = find("6-drain", "minitoolstream"), find("6-drain", "jetstream")
    if ours and peer and peer["msg_per_s"]:
        print(f"- Scenario 6, 4 competing consumers with acks: ours {ours['msg_per_s']} msg/s, JetStream "
              f"{peer['msg_per_s']} msg/s, ratio {ours['msg_per_s'] / peer['msg_per_s']:.2f}")

    if smoke:
        found, warnings = failures(runs)
        for warning in warnings:
            print(f"bench: warning: {warning}", file=sys.stderr)
        for problem in found:
            print(f"bench: {problem}", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    # --smoke: exit 1 on what `failures` finds.
    sys.exit(main(sys.argv[1], smoke="--smoke" in sys.argv[2:]))
