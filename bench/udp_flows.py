#!/usr/bin/env python3
"""Many short UDP flows (DNS-like): each query from a new socket, i.e. a new flow through a
tunnel. usage: udp_flows.py echo PORT | udp_flows.py run NAME HOST:PORT QUERIES CONCURRENCY

`echo` runs a one-socket UDP echo server (the backend). `run` sends QUERIES queries of 64 bytes,
CONCURRENCY at a time (threads), each from its own socket, waits up to 2 s for the echo, checks
it, and prints flows per second, p50 and p99 of the round trip, and failures."""
import socket
import statistics
import sys
import threading
import time


def echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def run(name, target, queries, concurrency):
    host, port = target.rsplit(":", 1)
    addr = (host, int(port))
    lock = threading.Lock()
    times, failed = [], [0]
    counter = iter(range(queries))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            payload = i.to_bytes(8, "big") * 8
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            t0 = time.perf_counter()
            try:
                s.sendto(payload, addr)
                got = s.recv(65535)
                ok = got == payload
            except OSError:
                ok = False
            dt = time.perf_counter() - t0
            s.close()
            with lock:
                if ok:
                    times.append(dt)
                else:
                    failed[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    times.sort()
    p50 = statistics.median(times) * 1e6 if times else float("nan")
    p99 = times[int(len(times) * 0.99) - 1] * 1e6 if times else float("nan")
    print(f"{name:10s} {queries} flows, {concurrency} at a time: {len(times) / wall:8.0f} flows/s "
          f"answered, round trip p50 {p50:8.0f} µs p99 {p99:8.0f} µs, failed {failed[0]}")


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(int(sys.argv[2]))
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
