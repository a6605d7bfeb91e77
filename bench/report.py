#!/usr/bin/env python3
"""Helpers of bench/run: parse tool outputs, and turn the results into the markdown table.

  report.py iperf FILE            -> "<Gbit/s> <bytes>"     (iperf3 -J output)
  report.py wrk FILE              -> "<req/s> <p50 ms> <p99 ms> <errors>"
  report.py get FILE KEY          -> value of a top-level key of a JSON object
  report.py idle FILE             -> "metric value" lines (memory per idle connection)
  report.py table RESULTS META VARIANTS [--write DOC]
"""
import json
import math
import re
import statistics
import sys

LABELS = {
    "direct": "DIRECT",
    "rathole": "RATHOLE",
    "sp-plain": "SALLYPORT-plain",
    "sp-tls": "SALLYPORT-TLS",
    "sp-copy": "SALLYPORT-plain-copy",
}

# key, label, unit, better ("high"/"low"), decimals, how rounds combine ("median"/"sum")
METRICS = [
    ("iperf_one", "iperf3, 1 stream", "Gbit/s", "high", 2, "median"),
    ("iperf_rev", "iperf3, 1 stream reverse (-R)", "Gbit/s", "high", 2, "median"),
    ("iperf_p4", "iperf3, 4 streams (-P 4)", "Gbit/s", "high", 2, "median"),
    ("cpu_per_gb", "tunnel CPU per GB moved (1 stream; both tunnel processes)", "ms/GB", "low", 0, "median"),
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
    ("storm_secs", "10,000 connections (50 in flight): total time", "s", "low", 2, "median"),
    ("storm_cps", "  connections per second", "conn/s", "high", 0, "median"),
    ("storm_err", "  errors (all rounds)", "count", "low", 0, "sum"),
]
for n in (1000, 8000):
    METRICS += [
        (f"mem_gw_{n}", f"idle connections ({n:,}): gateway / rathole server RSS per connection", "KiB", "low", 2, "median"),
        (f"mem_agent_{n}", f"idle connections ({n:,}): agent / rathole client RSS per connection", "KiB", "low", 2, "median"),
        (f"fds_gw_{n}", f"idle connections ({n:,}): gateway / rathole server descriptors per connection", "fds", "low", 2, "median"),
        (f"kern_{n}", f"idle connections ({n:,}): kernel slab + TCP buffers per connection (system-wide)", "KiB", "low", 2, "median"),
        (f"idle_err_{n}", f"  connections that failed to open (all rounds)", "count", "low", 0, "sum"),
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


def fmt(v, decimals):
    if v is None or nan(v):
        return "–"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def cmd_table(results, meta_path, variants, write=None):
    variants = variants.split()
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
                for ref, tag in (("direct", "D"), ("rathole", "R")):
                    r = vals.get(ref)
                    if ref != v and r not in (None, 0) and ref in variants:
                        ratios.append(f"{x / r:.2f}×{tag}")
            if ratios:
                cell += " (" + ", ".join(ratios) + ")"
            cells.append(cell)
        arrow = "↑" if better == "high" else "↓"
        rows.append(f"| {label} | {unit} | {arrow} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)

    info = [
        f"- date: {meta.get('date', '?')}; mode: {meta.get('mode', '?')}, {meta.get('rounds', '?')} round(s) "
        f"interleaved (each measurement runs every variant in turn, the order rotating per round), median shown",
        f"- machine: {meta.get('nproc', '?')} CPUs, {meta.get('cpu', '?')}, kernel {meta.get('kernel', '?')}, "
        f"{meta.get('os', '?')}",
        f"- versions: sallyport {meta.get('sallyport_rev', '?')}, rathole {meta.get('rathole', '?')}, "
        f"iperf3 {meta.get('iperf3', '?')}, wrk {meta.get('wrk', '?')}, nginx {meta.get('nginx', '?')}",
        f"- settings: {meta.get('settings', '?')}",
        f"- wall time: {meta.get('wall', '?')}",
    ]
    body = (
        "## Latest run\n\n"
        + "\n".join(info)
        + "\n\nEach cell: the median, then its ratio to DIRECT (×D) and to RATHOLE (×R). "
        "↑ higher is better, ↓ lower is better. All on 127.0.0.1, one machine: client, server, "
        "tunnel and load generator share the same CPUs.\n\n"
        + table
        + "\n"
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


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "iperf":
        cmd_iperf(*args)
    elif cmd == "wrk":
        cmd_wrk(*args)
    elif cmd == "get":
        cmd_get(*args)
    elif cmd == "idle":
        cmd_idle(*args)
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
