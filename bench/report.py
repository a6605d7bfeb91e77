#!/usr/bin/env python3
"""Helpers of bench/run: parse tool outputs, and turn the results into the markdown table.

  report.py iperf FILE            -> "<Gbit/s> <bytes>"     (iperf3 -J output)
  report.py wrk FILE              -> "<req/s> <p50 ms> <p99 ms> <errors>"
  report.py get FILE KEY          -> value of a top-level key of a JSON object
  report.py idle FILE             -> "metric value" lines (memory per idle connection)
  report.py sustained RATE_JSON TW_GATEWAY TW_AGENT
                                  -> "metric value" lines (loadgen rate output, and the
                                     `ss -Htan state time-wait` output of each namespace)
  report.py table RESULTS META VARIANTS SUSTAINED_VARIANTS [--write DOC]
"""
import json
import math
import re
import statistics
import sys

LABELS = {
    "direct": "DIRECT",
    "rathole": "RATHOLE",
    "rathole-tls": "RATHOLE-TLS",
    "rathole-noise": "RATHOLE-NOISE",
    "sp-plain": "SALLYPORT-plain",
    "sp-plain-reuse": "SALLYPORT-plain-reuse",
    "sp-tls": "SALLYPORT-TLS",
    "sp-tls-noreuse": "SALLYPORT-TLS-noreuse",
    "sp-tls-full": "SALLYPORT-TLS-full",
    "sp-copy": "SALLYPORT-plain-copy",
}

# key, label, unit, better ("high"/"low"), decimals, how rounds combine ("median"/"sum")
METRICS = [
    ("iperf_one", "iperf3, 1 stream", "Gbit/s", "high", 2, "median"),
    ("iperf_rev", "iperf3, 1 stream reverse (-R)", "Gbit/s", "high", 2, "median"),
    ("iperf_p4", "iperf3, 4 streams (-P 4)", "Gbit/s", "high", 2, "median"),
    ("cpu_per_gb", "tunnel CPU per GB moved (1 stream; both tunnel processes)", "ms/GB", "low", 0, "median"),
    ("udp_best", "iperf3 -u, 1 flow of 1200-byte datagrams: most delivered with < 1 % loss", "Mbit/s", "high", 0, "median"),
    ("udp_loss_100", "  loss at 100 Mbit/s offered", "%", "low", 2, "median"),
    ("udp_loss_300", "  loss at 300 Mbit/s offered", "%", "low", 2, "median"),
    ("udp_loss_600", "  loss at 600 Mbit/s offered", "%", "low", 2, "median"),
    ("udp_mbit_600", "  delivered at 600 Mbit/s offered", "Mbit/s", "high", 0, "median"),
    ("udp_loss_1000", "  loss at 1 Gbit/s offered", "%", "low", 2, "median"),
    ("udp_mbit_1000", "  delivered at 1 Gbit/s offered", "Mbit/s", "high", 0, "median"),
    ("wrk_close_rps", "HTTP 1 KiB, new connection per request", "req/s", "high", 0, "median"),
    ("wrk_close_p50", "  latency p50", "ms", "low", 3, "median"),
    ("wrk_close_p99", "  latency p99", "ms", "low", 3, "median"),
    ("wrk_close_err", "  socket errors + non-2xx (all rounds)", "count", "low", 0, "sum"),
    ("wrk_ka_rps", "HTTP 1 KiB, keep-alive", "req/s", "high", 0, "median"),
    ("wrk_ka_p50", "  latency p50", "ms", "low", 3, "median"),
    ("wrk_ka_p99", "  latency p99", "ms", "low", 3, "median"),
    ("wrk_ka_err", "  socket errors + non-2xx (all rounds)", "count", "low", 0, "sum"),
    ("ttfb_p50", "time to first byte, new connection, p50", "µs", "low", 0, "median"),
    ("ttfb_p99", "time to first byte, new connection, p99", "µs", "low", 0, "median"),
    ("ttfb_err", "  errors (all rounds)", "count", "low", 0, "sum"),
    ("ttfb_head_p50", "time to first byte, an HTTP request head first, p50", "µs", "low", 0, "median"),
    ("ttfb_head_p99", "  p99", "µs", "low", 0, "median"),
    ("ttfb_head_err", "  errors (all rounds)", "count", "low", 0, "sum"),
    ("ttfb_routed_p50", "  the same on a port shared by host name (routed by Host), p50", "µs", "low", 0, "median"),
    ("ttfb_routed_p99", "  p99", "µs", "low", 0, "median"),
    ("ttfb_routed_err", "  errors (all rounds)", "count", "low", 0, "sum"),
    ("storm_secs", "10,000 connections (50 in flight): total time", "s", "low", 2, "median"),
    ("storm_cps", "  connections per second", "conn/s", "high", 0, "median"),
    ("storm_err", "  errors (all rounds)", "count", "low", 0, "sum"),
    ("storm_cpu", "  tunnel CPU per 1,000 connections (both tunnel processes)", "ms", "low", 0, "median"),
]
for n in (1000, 8000):
    METRICS += [
        (f"mem_gw_{n}", f"idle connections ({n:,}): gateway / rathole server RSS per connection", "KiB", "low", 2, "median"),
        (f"mem_agent_{n}", f"idle connections ({n:,}): agent / rathole client RSS per connection", "KiB", "low", 2, "median"),
        (f"fds_gw_{n}", f"idle connections ({n:,}): gateway / rathole server descriptors per connection", "fds", "low", 2, "median"),
        (f"kern_{n}", f"idle connections ({n:,}): kernel slab + TCP buffers per connection (system-wide)", "KiB", "low", 2, "median"),
        (f"idle_err_{n}", f"  connections that failed to open (all rounds)", "count", "low", 0, "sum"),
    ]


# The sustained part's fixed ports inside its namespaces (bench/run measure_sustained).
SUS_PORTS = {"7000": "data", "7001": "client", "7002": "backend"}
SUSTAINED = [
    ("sus_offered", "offered: new clients per second (open loop)", "conn/s", "", 0, "median"),
    ("sus_rate", "achieved: clients answered per second of schedule", "conn/s", "high", 0, "median"),
    ("sus_err", "failed clients (all kinds)", "count", "low", 0, "sum"),
    ("sus_connect_err", "  connect failed", "count", "low", 0, "sum"),
    ("sus_timeout_err", "  no echo within 5 s", "count", "low", 0, "sum"),
    ("sus_closed_err", "  closed or reset before the echo", "count", "low", 0, "sum"),
    ("sus_shed_err", "  not started (8,000 already in flight)", "count", "low", 0, "sum"),
    ("sus_onset", "first tenth of the run with failures, from", "s", "", 1, "median"),
    ("sus_p50", "connect + first byte, p50 (from the scheduled start)", "ms", "low", 2, "median"),
    ("sus_p99", "connect + first byte, p99", "ms", "low", 2, "median"),
    ("sus_max", "connect + first byte, max", "ms", "low", 1, "median"),
    ("sus_inflight", "most clients in flight", "count", "low", 0, "median"),
    ("sus_tw_data_agent", "TIME-WAIT on one tuple: agent → gateway control port, held by the agent", "sockets", "low", 0, "median"),
    ("sus_tw_data_gateway", "TIME-WAIT on one tuple: agent → gateway control port, held by the gateway", "sockets", "low", 0, "median"),
    ("sus_tw_backend_agent", "TIME-WAIT on one tuple: agent → backend, held by the agent", "sockets", "low", 0, "median"),
    ("sus_tw_backend_backend", "TIME-WAIT on one tuple: agent → backend, held by the backend", "sockets", "low", 0, "median"),
    ("sus_tw_backend_client", "TIME-WAIT on one tuple: client → backend (DIRECT), held by the client", "sockets", "low", 0, "median"),
    ("sus_tw_client_gateway", "TIME-WAIT on one tuple: client → gateway, held by the gateway", "sockets", "low", 0, "median"),
    ("sus_tw_client_client", "TIME-WAIT on one tuple: client → gateway, held by the client", "sockets", "low", 0, "median"),
    ("sus_tw_total", "TIME-WAIT sockets in both namespaces", "sockets", "low", 0, "median"),
    ("sus_ports", "ephemeral ports per tuple (ip_local_port_range)", "ports", "", 0, "median"),
    ("sus_tw_reuse", "net.ipv4.tcp_tw_reuse (agent side)", "", "", 0, "median"),
    ("sus_max_tw", "net.ipv4.tcp_max_tw_buckets (agent side)", "", "", 0, "median"),
]


def nan(x):
    return isinstance(x, float) and math.isnan(x)


def cmd_iperf(path):
    try:
        with open(path) as f:
            d = json.load(f)
        s = d["end"]["sum_received"]
        print(f'{s["bits_per_second"] / 1e9:.4f} {int(s["bytes"])}')
    except Exception:
        print("nan 0")


def cmd_iperf_udp(path):
    """iperf3 -u --json: delivered Mbit/s (what the server received) and the loss in %."""
    try:
        with open(path) as f:
            d = json.load(f)
        s = d["end"]["sum"]
        loss = float(s["lost_percent"])
        print(f'{s["bits_per_second"] / 1e6 * (1 - loss / 100):.2f} {loss:.3f}')
    except Exception:
        print("nan nan")


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def cmd_wrk(path):
    text = open(path).read()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    pct = dict(
        (p, to_ms(v, u))
        for p, v, u in re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    )
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    print(
        f'{float(rps.group(1)) if rps else float("nan")} {pct.get("50", float("nan"))} '
        f'{pct.get("99", float("nan"))} {errors}'
    )


def cmd_get(path, key):
    try:
        with open(path) as f:
            print(json.load(f)[key])
    except Exception:
        print("nan")


def cmd_idle(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except Exception:
        return
    n = d["open"]
    print(f'errors {d["n"] - n}')
    if n == 0:
        return
    for name, p in d["procs"].items():
        print(f'mem_{name} {(p["rss_after_kib"] - p["rss_before_kib"]) / n:.3f}')
        print(f'fds_{name} {(p["fds_after"] - p["fds_before"]) / n:.3f}')
    kern = (d["slab_after_kib"] - d["slab_before_kib"]) + (d["tcp_mem_after_kib"] - d["tcp_mem_before_kib"])
    print(f"kern {kern / n:.3f}")


def time_wait_tuples(path, side):
    """Counts TIME-WAIT sockets per tuple (connecting IP, accepting IP:port) in one namespace's
    `ss -Htan state time-wait` output, keyed by link and by who holds them."""
    counts = {}
    for line in open(path):
        words = line.split()
        if len(words) < 4:
            continue
        local, peer = words[2], words[3]
        lip, lport = local.rsplit(":", 1)
        pip, pport = peer.rsplit(":", 1)
        if lport in SUS_PORTS:  # this side accepted
            link, holder, key = SUS_PORTS[lport], ("gateway" if side == "gateway" else "backend"), (pip, local)
        elif pport in SUS_PORTS:  # this side connected
            link, holder, key = SUS_PORTS[pport], ("client" if side == "gateway" else "agent"), (lip, peer)
        else:
            link, holder, key = "other", side, (lip, peer)
        counts.setdefault((link, holder), {}).setdefault(key, 0)
        counts[(link, holder)][key] += 1
    return counts


def cmd_sustained(rate_path, tw_gateway, tw_agent):
    with open(rate_path) as f:
        d = json.load(f)
    print(f'sus_offered {d["offered_per_s"]}')
    print(f'sus_ok {d["ok"]}')
    print(f'sus_rate {d["achieved_per_s"]}')
    print(f'sus_err {d["errors"]}')
    print(f'sus_connect_err {d["connect_errors"]}')
    print(f'sus_timeout_err {d["timeouts"]}')
    print(f'sus_closed_err {d["closed_early"]}')
    print(f'sus_shed_err {d["shed"]}')
    onset = next((w["from_s"] for w in d["windows"] if w["errors"] > 0), float("nan"))
    print(f"sus_onset {onset}")
    print(f'sus_p50 {d["p50_ms"]}')
    print(f'sus_p99 {d["p99_ms"]}')
    print(f'sus_max {d["max_ms"]}')
    print(f'sus_inflight {d["max_in_flight"]}')
    total = 0
    for path, side in ((tw_gateway, "gateway"), (tw_agent, "agent")):
        for (link, holder), tuples in time_wait_tuples(path, side).items():
            total += sum(tuples.values())
            if link != "other":
                print(f"sus_tw_{link}_{holder} {max(tuples.values())}")
    print(f"sus_tw_total {total}")


def fmt(v, decimals):
    if v is None or nan(v):
        return "–"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def cmd_table(results, meta_path, variants, sus_variants="", write=None):
    variants = variants.split()
    sus_variants = sus_variants.split()
    values = {}
    for line in open(results):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        _, metric, variant, value = parts
        try:
            v = float(value)
        except ValueError:
            continue
        values.setdefault((metric, variant), []).append(v)
    meta = {}
    for line in open(meta_path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta[k] = v

    def combined(metric, variant, how):
        xs = [x for x in values.get((metric, variant), []) if not nan(x)]
        if not xs:
            return None
        return sum(xs) if how == "sum" else statistics.median(xs)

    head = ["measurement", "unit", "better"] + [LABELS[v] for v in variants]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(variants)]
    for key, label, unit, better, dec, how in METRICS:
        vals = {v: combined(key, v, how) for v in variants}
        if all(x is None for x in vals.values()):
            continue
        cells = []
        for v in variants:
            x = vals[v]
            cell = fmt(x, dec)
            ratios = []
            if how != "sum" and x is not None:
                refs = [("direct", "D"), ("rathole", "R")]
                if v.startswith("sp-"):
                    refs.append(("rathole-tls", "T"))  # Sallyport against rathole's own TLS
                for ref, tag in refs:
                    r = vals.get(ref)
                    if ref != v and r not in (None, 0) and ref in variants:
                        ratios.append(f"{x / r:.2f}×{tag}")
            if ratios:
                cell += " (" + ", ".join(ratios) + ")"
            cells.append(cell)
        arrow = "↑" if better == "high" else "↓"
        rows.append(f"| {label} | {unit} | {arrow} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) if len(rows) > 2 else "(main table not run: --no-main)"
    latency = latency_table(combined, variants, {m for (m, _v) in values})
    sustained = sustained_table(combined, sus_variants)

    info = [
        f"- date: {meta.get('date', '?')}; mode: {meta.get('mode', '?')}, {meta.get('rounds', '?')} round(s) "
        f"interleaved (each measurement runs every variant in turn, the order rotating per round), median shown",
        f"- machine: {meta.get('nproc', '?')} CPUs, {meta.get('cpu', '?')}, kernel {meta.get('kernel', '?')}, "
        f"{meta.get('os', '?')}",
        f"- versions: sallyport {meta.get('sallyport_rev', '?')}, rathole {meta.get('rathole', '?')}, "
        f"iperf3 {meta.get('iperf3', '?')}, wrk {meta.get('wrk', '?')}, nginx {meta.get('nginx', '?')}",
        f"- settings: {meta.get('settings', '?')}",
        f"- wall time: {meta.get('wall', '?')}; load average (1 min) before / after: "
        f"{meta.get('load_before', '?')} / {meta.get('load_after', '?')} (other work on the machine "
        f"moves every figure)",
    ]
    body = (
        "## Latest run\n\n"
        + "\n".join(info)
        + "\n\nEach cell: the median, then its ratio to DIRECT (×D), to RATHOLE (×R) and, for "
        "Sallyport, to RATHOLE-TLS (×T). ↑ higher is better, ↓ lower is better. All on "
        "127.0.0.1, one machine: client, server, tunnel and load generator share the same CPUs. "
        "SALLYPORT-TLS-noreuse: one TLS data connection per client (no reuse), with resumed "
        "sessions; SALLYPORT-TLS-full: the same with TLS resumption off, a full handshake per "
        "client (the path before issue 15; bench/README.md).\n\n"
        + table
        + "\n"
        + latency
        + sustained
    )
    print(body)
    if write:
        marker = "<!-- bench/run writes everything below this line -->"
        try:
            kept = open(write).read().split(marker)[0]
        except FileNotFoundError:
            kept = "# Performance\n\nMeasured with `bench/run` (see `bench/README.md`).\n\n"
        with open(write, "w") as f:
            f.write(kept.rstrip("\n") + "\n\n" + marker + "\n\n" + body)


def latency_table(combined, variants, metrics):
    delays = sorted((m[len("lat_p50_") :] for m in metrics if m.startswith("lat_p50_")), key=float)
    if not delays:
        return ""
    head = ["agent link (one way)", "measurement"] + [LABELS[v] for v in variants]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(variants)]
    for key in delays:
        rtt = 2 * float(key)
        direct = combined(f"lat_p50_{key}", "direct", "median")
        for what, label in (("p50", "TTFB p50: ms (round trips)"), ("p99", "TTFB p99: ms (round trips)")):
            cells = []
            for v in variants:
                x = combined(f"lat_{what}_{key}", v, "median")
                if x is None:
                    cells.append("–")
                    continue
                cell = f"{x:,.2f} ({x / rtt:.1f} RTT"
                if what == "p50" and v != "direct" and direct is not None:
                    cell += f", {(x - direct) / rtt:+.1f} vs DIRECT"
                cells.append(cell + ")")
            rows.append(f"| {key} ms | {label} | " + " | ".join(cells) + " |")
        errs = [combined(f"lat_err_{key}", v, "sum") for v in variants]
        rows.append(f"| {key} ms | errors | " + " | ".join(fmt(e, 0) for e in errs) + " |")
    return (
        "\n### Time to first byte over a slow agent link\n\n"
        "`loadgen ttfb` (connect, send 1 byte, read its echo) through a client-link relay into the "
        "tunnel, whose agent reaches the gateway through a delay relay (`loadgen delay`: every chunk "
        "held D ms each way, and a new connection pays the TCP handshake's round trip). DIRECT: the "
        "client reaches the backend through the same two relays, no tunnel: a connection and one "
        "echo cost it 2 round trips. Connections one at a time, spaced 20 round trips apart (a "
        "site whose clients come and go, so pools have refilled). RTT = 2 × D; \"vs DIRECT\" is "
        "the difference in round trips.\n\n" + "\n".join(rows) + "\n"
    )


def sustained_table(combined, variants):
    if not variants:
        return ""
    head = ["measurement", "unit", "better"] + [LABELS[v] for v in variants]
    rows = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(variants)]
    for key, label, unit, better, dec, how in SUSTAINED:
        vals = [combined(key, v, how) for v in variants]
        if all(x is None for x in vals):
            continue
        arrow = {"high": "↑", "low": "↓"}.get(better, "")
        rows.append(f"| {label} | {unit} | {arrow} | " + " | ".join(fmt(x, dec) for x in vals) + " |")
    return (
        "\n### Sustained rate through one agent\n\n"
        "`loadgen rate`: new clients on a fixed schedule (open loop: they arrive whether or not "
        "earlier ones are done), each connecting, sending 1 byte, reading the echo and waiting for "
        "the backend to close first (as with `Connection: close`). Gateway and agent in two network "
        "namespaces joined by a veth link (not loopback: the kernel's defaults for a real link), "
        "clients from 16 addresses. TIME-WAIT counted right after the last client, per tuple "
        "(connecting address, accepting address and port): a tuple whose connecting side holds "
        "TIME-WAIT has at most as many new connections per 60 s as it has ephemeral ports "
        "(28,232 by default: about 470 per second).\n\n" + "\n".join(rows) + "\n"
    )


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "iperf":
        cmd_iperf(*args)
    elif cmd == "iperf_udp":
        cmd_iperf_udp(*args)
    elif cmd == "wrk":
        cmd_wrk(*args)
    elif cmd == "get":
        cmd_get(*args)
    elif cmd == "idle":
        cmd_idle(*args)
    elif cmd == "sustained":
        cmd_sustained(*args)
    elif cmd == "table":
        write = None
        if "--write" in args:
            i = args.index("--write")
            write = args[i + 1]
            args = args[:i] + args[i + 2 :]
        cmd_table(*args, write=write)
    else:
        sys.exit(f"report.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
