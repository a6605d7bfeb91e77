#!/usr/bin/python3
"""The chaos soak behind bench/soak (issue 21): two gateways and two agents of one site with
mutual TLS, continuous byte-checked clients of mixed sizes and protocols (an echo backend, real
nginx, real sshd/sftp), and faults on a schedule; then the verdict: corrupted bytes, failed
clients each explained by a fault in flight, descriptors / RSS / TCP states per daemon at quiet
points, and a plot. Everything runs in a network namespace of its own (loopback inside it), so
no port, socket count or sysctl of the machine is touched and none of its traffic leaves it.

Only the Python standard library (Debian's python3) plus matplotlib (python3-matplotlib) for the
plot. bench/soak installs the packages, builds the binaries and runs this file; see
bench/README.md for the topology, the faults and how failures are explained.

It must never: end a process it did not start (every PID it kills is one it spawned, or one left
in its own namespace), send traffic outside its namespace, or call a run good that had a
corrupted byte, an unexplained failure, a fault that did not heal, or a leak.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# ------------------------------------------------------------------------------ addresses
# Inside the soak's namespace: each gateway has its own public address; the agents dial the
# gateways at distinct addresses (all covered by the gateway certificate), so a firewall rule can
# cut agent 1's path to gateway 1 alone; agent paths to gateway 2 go through the delay relay.
G_PUBLIC = ["127.0.1.1", "127.0.2.1"]
G_CONTROL_PORT = [44501, 44502]
G_ADMIN = ["127.0.0.1:9191", "127.0.0.1:9192"]
A_ADMIN = ["127.0.0.1:9193", "127.0.0.1:9194"]
# Where each daemon's /metrics is: the heap figures (allocated vs kept free) come from there.
METRICS = {"g1": G_ADMIN[0], "g2": G_ADMIN[1], "a1": A_ADMIN[0], "a2": A_ADMIN[1]}
A1_TO_G1 = "127.0.1.11"
A2_TO_G1 = "127.0.1.12"
RELAY = "127.0.2.100"
RELAY_PORT = 44602
BACKEND_IP = "127.0.3.1"
PORTS = {"echo": 7101, "http": 7102, "ssh": 7122, "dyn": 7103}
BACKEND_PORTS = {"echo": 7001, "http": 7002, "ssh": 7022}
DAEMONS = ["g1", "g2", "a1", "a2"]
SFTP_USER = "sallyport-test"  # the account tests/support/sshd.rs uses too

# The agents' timers: small, so a fault heals in seconds (the defaults are 5 s heartbeat, 10 s
# connect timeout, 0.5-30 s backoff; every recovery time here scales with them).
HEARTBEAT_S = 0.5
AGENT_TIMERS = 'heartbeat = "500ms"\nconnect_timeout = "1s"\n\n[reconnect]\ninitial = "100ms"\nmax = "1s"\n'

# ------------------------------------------------------------------------------ byte pattern
# Every byte a client sends or expects is PAT at (seed + offset) mod 1 MiB: any corruption,
# duplication, loss or reordering shows up as a mismatch at a known offset.
PAT_LEN = 1 << 20
PAT = random.Random(21).randbytes(PAT_LEN)
PAT2 = PAT + PAT
CHUNK = 256 * 1024


def pattern(seed, off, n):
    """n <= PAT_LEN bytes of the stream `seed` from offset `off`."""
    i = (seed + off) % PAT_LEN
    return PAT2[i:i + n]


class Check:
    """Compares a received stream with the pattern; counts bytes and corrupted bytes."""

    def __init__(self, seed):
        self.seed, self.got, self.bad, self.first_bad = seed, 0, 0, None

    def feed(self, data):
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, PAT_LEN)
            part = data[pos:pos + n] if pos or n != len(data) else data
            want = pattern(self.seed, self.got, n)
            if part != want:
                bad = sum(1 for a, b in zip(part, want) if a != b)
                if bad and self.first_bad is None:
                    self.first_bad = self.got + next(i for i, (a, b) in enumerate(zip(part, want)) if a != b)
                self.bad += bad
            self.got += n
            pos += n


def write_pattern_file(path, seed, size):
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(PAT_LEN, size - off)
            f.write(pattern(seed, off, n))
            off += n


def seed_of(size):
    return (size * 7919) % PAT_LEN


# ------------------------------------------------------------------------------ small helpers
T0 = time.monotonic()
T0_WALL = time.time()


def now():
    return time.monotonic() - T0


def log(msg):
    print(f"[soak {now():7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


class Proc:
    """A process the soak started (a daemon, a backend): stopped and restarted by its PID."""

    def __init__(self, name, argv, work, env=None):
        self.name, self.argv, self.work, self.env = name, argv, work, env
        self.popen, self.starts = None, 0
        self.log_path = os.path.join(work, f"{name}.log")

    def start(self):
        self.starts += 1
        logf = open(self.log_path, "a")
        logf.write(f"--- start {self.starts} at {now():.1f}s\n")
        logf.flush()
        env = dict(os.environ, **(self.env or {}))
        self.popen = subprocess.Popen(self.argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, env=env)
        logf.close()
        return self

    @property
    def pid(self):
        return self.popen.pid if self.popen and self.popen.poll() is None else None

    def send(self, sig):
        if self.pid:
            os.kill(self.popen.pid, sig)

    def stop(self, sig=signal.SIGTERM, wait=5.0):
        if not self.popen:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


async def wait_for(what, pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_accepts(ip, port):
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def echo_ok(ip, port):
    try:
        with socket.create_connection((ip, port), timeout=1) as s:
            s.settimeout(3)
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def proc_figures(pid):
    """(RSS KiB, open descriptors, of which pipes) of a process, or None when it is gone. With
    plaintext data connections the daemons keep a pool of splice pipes (up to 64, two
    descriptors each) that follows the transfers in flight: counted apart, not a leak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = pipes = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            try:
                pipes += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
            except OSError:
                pass
        return rss, fds, pipes
    except (OSError, StopIteration):
        return None


HEAP_SAMPLE = re.compile(r'^sallyport(?:_agent)?_heap_bytes\{state="(allocated|free)"\} (\S+)$', re.M)
SESSIONS_SAMPLE = re.compile(r'^sallyport_tls_session_bytes (\S+)$', re.M)


def heap_figures(daemon):
    """(allocated KiB, free KiB, TLS sessions KiB) of a daemon's heap from its /metrics (glibc's
    mallinfo2), or None. Allocated is what the program holds, the leak criterion; free is what
    the allocator keeps for reuse after a peak, which shows in RSS without being held by
    anything; a gateway's TLS session cache (for resumption) fills up to its bound over the run
    and is counted apart (0 for an agent)."""
    try:
        with urllib.request.urlopen(f"http://{METRICS[daemon]}/metrics", timeout=0.5) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    got = {k: int(float(v)) // 1024 for k, v in HEAP_SAMPLE.findall(text)}
    sessions = sum(int(float(v)) // 1024 for v in SESSIONS_SAMPLE.findall(text))
    return (got["allocated"], got["free"], sessions) if len(got) == 2 else None


SS_PID = re.compile(r"pid=(\d+)")


def tcp_states():
    """{pid: {state: count}} of every TCP socket in the namespace, and the TIME-WAIT sockets as
    (local, peer) pairs (they belong to no process any more)."""
    out = run(["ss", "-tanpH"], check=False).stdout
    by_pid, time_wait = {}, []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        state = f[0]
        if state == "TIME-WAIT":
            time_wait.append((f[3], f[4]))
            continue
        for pid in set(SS_PID.findall(line)):
            d = by_pid.setdefault(int(pid), {})
            d[state] = d.get(state, 0) + 1
    return by_pid, time_wait


def tw_owner(local, peer):
    """Which side left a TIME-WAIT socket: the gateway whose port it was, or the agents (their
    data and backend connections), or others (clients, relay, backends)."""
    lip, lport = local.rsplit(":", 1)
    pip, pport = peer.rsplit(":", 1)
    lport, pport = int(lport), int(pport)
    for g in (0, 1):
        if lport == G_CONTROL_PORT[g] or (lip == G_PUBLIC[g]):
            return f"g{g + 1}"
    if pport in G_CONTROL_PORT or pport == RELAY_PORT or (pip == BACKEND_IP and pport in BACKEND_PORTS.values()):
        return "agents"
    return "others"


# ------------------------------------------------------------------------------ the soak
class Soak:
    def __init__(self, args):
        self.args = args
        self.duration = args.seconds if args.seconds else args.minutes * 60
        self.short = self.duration < 300
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="sallyport-soak.")
        os.chmod(self.work, 0o755)
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.procs = {}
        self.clients = []  # finished client records
        self.inflight = {}  # id -> record
        self.next_id = 0
        self.faults = []
        self.samples = []
        self.quiet = []  # quiet-point samples
        self.received = 0  # verified bytes received by clients
        self.paused = False
        self.stop_new = False
        self.dyn_open = False
        self.problems = []  # faults that did not heal, harness errors
        self.restarted_at = {d: [] for d in DAEMONS}

    # -------------------------------------------------------------------- setup
    def sp(self, *args):
        return [self.args.sallyport, *args]

    def write(self, name, text):
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def setup(self):
        w = self.work
        run(["ip", "link", "set", "lo", "up"])
        # Certificates: the gateway's covers every address the agents dial.
        ips = [A1_TO_G1, A2_TO_G1, RELAY]
        cmd = self.sp("cert", "init", "--dir", f"{w}/certs", "--agent-name", "soak-a2")
        for ip in ips:
            cmd += ["--gateway-ip", ip]
        run(cmd)
        c = f"{w}/certs"
        for g in (0, 1):
            self.write(f"g{g + 1}.toml", f"""[control]
listen = "0.0.0.0:{G_CONTROL_PORT[g]}"
tls = {{ cert = "{c}/gateway.crt", key = "{c}/gateway.key", client_ca = "{c}/ca.crt" }}

data_tls = {"false" if self.args.plain else "true"}

[clients]
bind = "{G_PUBLIC[g]}"

# Everything here runs on the namespace's own loopback (agents and the delay relay alike).
[peers]
default = "deny"
except = ["127.0.0.0/8"]

[admin]
listen = "{G_ADMIN[g]}"
""")
        self.write_agent_configs(dyn=False)
        self.write("delay_ms", "0\n")
        # Files for nginx and sftp: the pattern stream, seeded by size.
        os.makedirs(f"{w}/www", exist_ok=True)
        os.makedirs(f"{w}/files", exist_ok=True)
        for size in HTTP_SIZES:
            write_pattern_file(f"{w}/www/f{size}", seed_of(size), size)
        for size in SFTP_SIZES:
            write_pattern_file(f"{w}/files/up{size}", seed_of(size), size)
        self.setup_sshd()
        self.write("nginx.conf", f"""daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  client_body_temp_path {w}/tmp; proxy_temp_path {w}/tmp; fastcgi_temp_path {w}/tmp;
  uwsgi_temp_path {w}/tmp; scgi_temp_path {w}/tmp;
  access_log off;
  server {{ listen {BACKEND_IP}:{BACKEND_PORTS['http']}; root {w}/www; location / {{ }} }}
}}
""")
        os.makedirs(f"{w}/tmp", exist_ok=True)
        lg = self.args.loadgen
        log_env = {"SALLYPORT_LOG": "info"}
        self.procs = {
            "echo": Proc("echo", [lg, "echo", "--listen", f"{BACKEND_IP}:{BACKEND_PORTS['echo']}"], w),
            "nginx": Proc("nginx", ["/usr/sbin/nginx", "-c", f"{w}/nginx.conf", "-p", f"{w}/"], w),
            "sshd": Proc("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", f"{w}/sshd_config"], w),
            "relay": Proc("relay", [lg, "delay", "--listen", f"{RELAY}:{RELAY_PORT}",
                                    "--to", f"127.0.0.1:{G_CONTROL_PORT[1]}", "--delay-file", f"{w}/delay_ms"], w),
            "g1": Proc("g1", self.sp("gateway", "--config", f"{w}/g1.toml"), w, log_env),
            "g2": Proc("g2", self.sp("gateway", "--config", f"{w}/g2.toml"), w, log_env),
            "a1": Proc("a1", self.sp("agent", "--config", f"{w}/a1.toml"), w, log_env),
            "a2": Proc("a2", self.sp("agent", "--config", f"{w}/a2.toml"), w, log_env),
        }

    def write_agent_configs(self, dyn):
        c = f"{self.work}/certs"
        listeners = ""
        for name in ("echo", "http", "ssh") + (("dyn",) if dyn else ()):
            backend = BACKEND_PORTS["echo" if name == "dyn" else name]
            listeners += f'\n[[listener]]\nname = "{name}"\npublic = "{PORTS[name]}"\nbackend = "{BACKEND_IP}:{backend}"\n'
        for a, to_g1, cert in (("a1", A1_TO_G1, "agent"), ("a2", A2_TO_G1, "soak-a2")):
            self.write(f"{a}.toml", f"""site = "soak"
name = "soak-{a}"
gateways = ["{to_g1}:{G_CONTROL_PORT[0]}", "{RELAY}:{RELAY_PORT}"]
tls = {{ ca = "{c}/ca.crt", cert = "{c}/{cert}.crt", key = "{c}/{cert}.key" }}
admin.listen = "{A_ADMIN[0 if a == "a1" else 1]}"
{AGENT_TIMERS}{listeners}""")

    def setup_sshd(self):
        w = self.work
        if run(["id", "-u", SFTP_USER], check=False).returncode != 0:
            run(["useradd", "--create-home", "--shell", "/bin/sh", SFTP_USER], check=False)
        run(["usermod", "-p", "*", SFTP_USER])
        os.makedirs("/run/sshd", exist_ok=True)
        os.makedirs(f"{w}/sftp-data", exist_ok=True)
        os.chmod(f"{w}/sftp-data", 0o777)
        for k in ("host_key", "client_key"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{w}/{k}"])
        shutil.copy(f"{w}/client_key.pub", f"{w}/authorized_keys")
        os.chmod(f"{w}/authorized_keys", 0o644)
        self.write("sshd_config", f"""Port {BACKEND_PORTS['ssh']}
ListenAddress {BACKEND_IP}
HostKey {w}/host_key
PidFile {w}/sshd.pid
AuthorizedKeysFile {w}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers {SFTP_USER}
Subsystem sftp internal-sftp
LogLevel INFO
MaxStartups 100:30:200
""")

    def count_log(self, daemon, needle):
        return self.procs[daemon].log_text().count(needle)

    def agent_joins(self, g, a):
        """How often gateway g logged agent a connected."""
        return sum(1 for l in self.procs[g].log_text().splitlines()
                   if "agent connected (" in l and f"agent=soak-{a}" in l)

    async def start_all(self):
        p = self.procs
        for name in ("echo", "nginx", "sshd", "relay"):
            p[name].start()
        await wait_for("backends", lambda: all(port_accepts(BACKEND_IP, BACKEND_PORTS[s]) for s in BACKEND_PORTS), 10)
        for g in ("g1", "g2"):
            p[g].start()
        await wait_for("gateways", lambda: all(port_accepts("127.0.0.1", G_CONTROL_PORT[i]) for i in (0, 1)), 10)
        for a in ("a1", "a2"):
            p[a].start()
        await self.wait_served(["a1", "a2"], ["g1", "g2"], {})

    async def wait_served(self, agents, gateways, before, timeout=20):
        """Waits until each agent has (re)joined each gateway since `before` (join counts), and
        every public listener answers on both gateways."""
        def joined():
            return all(self.agent_joins(g, a) > before.get((g, a), 0) for g in gateways for a in agents)
        await wait_for(f"{', '.join(agents)} joined {', '.join(gateways)}", joined, timeout)
        await wait_for("the echo listener on both gateways",
                       lambda: all(echo_ok(G_PUBLIC[g], PORTS["echo"]) for g in (0, 1)), timeout)

    def joins(self):
        return {(g, a): self.agent_joins(g, a) for g in ("g1", "g2") for a in ("a1", "a2")}

    # -------------------------------------------------------------------- clients
    def new_record(self, kind, proto, gw, size):
        self.next_id += 1
        rec = {"id": self.next_id, "kind": kind, "proto": proto, "gw": gw, "size": size,
               "t0": now(), "t1": None, "ok": False, "cause": None, "detail": "", "got": 0, "bad": 0,
               "small_bufs": self.small_bufs}
        self.inflight[rec["id"]] = rec
        return rec

    def snapshot(self, rec):
        """The namespace's sockets with their queues and the daemons' pids, saved when a client
        stalls: which socket holds the bytes is the first question about a stall."""
        path = os.path.join(self.out, f"stall-{rec['id']}.txt")
        pids = {d: self.procs[d].pid for d in DAEMONS}
        with open(path, "w") as f:
            f.write(f"client {json.dumps(rec)}\ndaemons {pids}\n")
            f.write(run(["ps", "-eo", "pid,ppid,args"], check=False).stdout + "\n")
            f.write(run(["ss", "-tanpie"], check=False).stdout)
        rec["snapshot"] = os.path.basename(path)

    def finish(self, rec, cause=None, detail=""):
        if cause == "stall" and "snapshot" not in rec:
            self.snapshot(rec)
        rec["t1"] = now()
        rec["ok"] = cause is None
        rec["cause"], rec["detail"] = cause, detail[:300]
        if rec["bad"]:
            rec["ok"], rec["cause"] = False, "corrupt"
            rec["detail"] = (f"{rec['bad']} corrupted bytes, the first at offset {rec.get('first_bad')}; "
                             + rec["detail"]).rstrip("; ")
        self.inflight.pop(rec["id"], None)
        self.clients.append(rec)
        if not rec["ok"] and rec["cause"] not in ("refused", "empty"):  # those come in hundreds
            log(f"client {rec['id']} {rec['proto']} via g{rec['gw'] + 1} {rec['size']} B failed after "
                f"{rec['t1'] - rec['t0']:.1f} s: {rec['cause']} {rec['detail']}")

    async def read_checked(self, reader, check, rec, expect, stall_s):
        while check.got < expect:
            data = await asyncio.wait_for(reader.read(CHUNK), stall_s)
            if not data:
                return False
            check.feed(data)
            rec["got"], rec["bad"], rec["first_bad"] = check.got, check.bad, check.first_bad
            self.received += len(data)
        return True

    async def echo_client(self, gw, size, proto="echo", stall_reader=0.0):
        rec = self.new_record("stall-reader" if stall_reader else "client", proto, gw, size)
        seed = self.rng.randrange(PAT_LEN)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(G_PUBLIC[gw], PORTS[proto], limit=4 * CHUNK), 10)
            rec["port"] = writer.get_extra_info("sockname")[1]

            async def send():
                off = 0
                while off < size:
                    n = min(CHUNK, size - off)
                    writer.write(pattern(seed, off, n))
                    await writer.drain()
                    off += n
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            try:
                if stall_reader:
                    await asyncio.sleep(stall_reader)  # zero window: nothing read meanwhile
                check = Check(seed)
                complete = await self.read_checked(reader, check, rec, size, self.stall_s)
                if not complete:
                    return self.finish(rec, "empty" if check.got == 0 else "truncated",
                                       f"{check.got} of {size} B echoed, then end of stream")
                await asyncio.wait_for(sender, self.stall_s)
                if await asyncio.wait_for(reader.read(1), self.stall_s):
                    return self.finish(rec, "extra-bytes", "bytes after the echo")
                self.finish(rec)
            finally:
                sender.cancel()
        except Exception as e:  # noqa: BLE001 (every failure is classified, none is lost)
            self.finish(rec, *classify(e, rec))
        finally:
            close(writer)

    async def http_client(self, gw, size, stall_reader=0.0):
        rec = self.new_record("stall-reader" if stall_reader else "client", "http", gw, size)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(G_PUBLIC[gw], PORTS["http"], limit=4 * CHUNK), 10)
            rec["port"] = writer.get_extra_info("sockname")[1]
            writer.write(f"GET /f{size} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            if stall_reader:
                await asyncio.sleep(stall_reader)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.stall_s)
            except asyncio.IncompleteReadError as e:
                return self.finish(rec, "empty", f"end of stream after {len(e.partial)} B of headers")
            status = head.split(b" ", 2)[1] if b" " in head else b"?"
            if status != b"200":
                return self.finish(rec, "http-status", head.split(b"\r\n")[0].decode(errors="replace"))
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if not m or int(m.group(1)) != size:
                return self.finish(rec, "http-length", f"Content-Length {m and m.group(1)}")
            check = Check(seed_of(size))
            if not await self.read_checked(reader, check, rec, size, self.stall_s):
                return self.finish(rec, "truncated", f"{check.got} of {size} B, then end of stream")
            if await asyncio.wait_for(reader.read(1), self.stall_s):
                return self.finish(rec, "extra-bytes", "bytes after the body")
            self.finish(rec)
        except Exception as e:  # noqa: BLE001
            self.finish(rec, *classify(e, rec))
        finally:
            close(writer)

    async def sftp_client(self, gw, size):
        """Real OpenSSH sftp: put a file, get it back, compare; the server's copy is compared
        too before it is removed."""
        rec = self.new_record("client", "ssh", gw, size)
        w = self.work
        name = f"s{rec['id']}"
        back = f"{w}/files/{name}.back"
        batch = self.write(f"files/{name}.batch",
                           f"put {w}/files/up{size} {w}/sftp-data/{name}\nget {w}/sftp-data/{name} {back}\n")
        cmd = ["sftp", "-b", batch, "-i", f"{w}/client_key", "-P", str(PORTS["ssh"]),
               "-o", f"UserKnownHostsFile={w}/known_hosts", "-o", "StrictHostKeyChecking=no",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"{SFTP_USER}@{G_PUBLIC[gw]}"]
        deadline = 20 + size / (2 << 20)  # sftp reports no progress: a whole-session bound
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), deadline)
        except asyncio.TimeoutError:
            rec["detail"] = f"sftp pid {proc.pid}"
            self.snapshot(rec)  # before the kill: the session's sockets and their queues
            proc.kill()  # our own child, by PID
            await proc.wait()
            self.cleanup_sftp(name, back)
            return self.finish(rec, "stall", f"sftp session not done after {deadline:.0f} s")
        if proc.returncode != 0:
            self.cleanup_sftp(name, back)
            last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            return self.finish(rec, sftp_cause(last), f"sftp exit {proc.returncode}: {last}")
        for path in (f"{w}/sftp-data/{name}", back):
            check = Check(seed_of(size))
            with open(path, "rb") as f:
                while data := f.read(PAT_LEN):
                    check.feed(data)
            rec["bad"] += check.bad
            if check.bad and rec.get("first_bad") is None:
                rec["first_bad"] = check.first_bad
            if check.got != size:
                self.cleanup_sftp(name, back)
                return self.finish(rec, "truncated", f"{path}: {check.got} of {size} B")
        rec["got"] = 2 * size
        self.received += 2 * size
        self.cleanup_sftp(name, back)
        self.finish(rec)

    def cleanup_sftp(self, name, back):
        for p in (f"{self.work}/sftp-data/{name}", back, f"{self.work}/files/{name}.batch"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    async def worker(self, kind):
        while not self.stop_new:
            if self.paused or (kind == "dyn" and not self.dyn_open):
                await asyncio.sleep(0.05)
                continue
            gw = self.rng.randrange(2)
            if kind == "mixed":
                size = pick(self.rng, SHORT_SIZES)
                if self.rng.random() < 0.5:
                    await self.echo_client(gw, size)
                else:
                    await self.http_client(gw, size)
            elif kind == "long":
                if self.rng.random() < 0.5:
                    await self.echo_client(gw, LONG_SIZE)
                else:
                    await self.http_client(gw, LONG_SIZE)
            elif kind == "sftp":
                await self.sftp_client(gw, pick(self.rng, SFTP_WEIGHTS))
            elif kind == "dyn":
                await self.echo_client(gw, pick(self.rng, SHORT_SIZES[:4]), proto="dyn")
            await asyncio.sleep(0.01)

    # -------------------------------------------------------------------- measurements
    def sample(self, quiet=False, heap=True):
        by_pid, tw = tcp_states()
        row = {"t": round(now(), 2), "active": len(self.inflight), "received": self.received,
               "quiet": quiet}
        for d in DAEMONS:
            pid = self.procs[d].pid
            fig = proc_figures(pid) if pid else None
            st = by_pid.get(pid, {}) if pid else {}
            row[d] = None if not fig else {
                "pid": pid, "rss_kib": fig[0], "fds": fig[1], "pipes": fig[2], "estab": st.get("ESTAB", 0),
                "close_wait": st.get("CLOSE-WAIT", 0)}
            h = heap_figures(d) if fig and heap else None
            if h:
                row[d]["heap_kib"], row[d]["heap_free_kib"], row[d]["sessions_kib"] = h
        counts = {}
        for local, peer in tw:
            o = tw_owner(local, peer)
            counts[o] = counts.get(o, 0) + 1
        row["time_wait"] = counts
        return row

    async def sampler(self):
        last = self.received
        n = 0
        while True:
            # The heap figures cost an HTTP request per daemon: every 5 s is enough for the plot.
            row = self.sample(heap=n % 5 == 0)
            n += 1
            row["mib_s"] = round((row["received"] - last) / (1 << 20), 2)
            last = row["received"]
            self.samples.append(row)
            await asyncio.sleep(1.0)

    async def quiet_point(self, label):
        """Stops new clients, waits for the running ones to end and the daemons to settle, and
        samples: the leak check compares these points, free of load."""
        self.paused = True
        try:
            await wait_for("running clients to finish", lambda: not self.inflight, 90)
        except RuntimeError:
            self.problems.append(f"quiet point {label}: {len(self.inflight)} clients still running after 90 s")
        await asyncio.sleep(2.0)
        row = self.sample(quiet=True)
        row["label"] = label
        self.quiet.append(row)
        log(f"quiet point {label}: " + ", ".join(
            f"{d} fds {row[d]['fds']} rss {row[d]['rss_kib'] // 1024} MiB cw {row[d]['close_wait']}"
            for d in DAEMONS if row[d]))
        self.paused = False

    # -------------------------------------------------------------------- faults
    def fault(self, kind, target, gws=(0, 1), protos=("echo", "http", "ssh", "dyn"), causes=(),
              at_start_only=False):
        f = {"kind": kind, "target": target, "t0": now(), "t1": None, "gws": list(gws),
             "protos": list(protos), "causes": list(causes), "at_start_only": at_start_only,
             "explained": 0}
        self.faults.append(f)
        log(f"fault: {kind} {target}")
        return f

    def end_fault(self, f):
        f["t1"] = now()
        log(f"fault over: {f['kind']} {f['target']} ({f['t1'] - f['t0']:.1f} s)")

    async def f_cut_control(self, hold):
        """Cuts agent 1's control connection to gateway 1 (and its new connections there) with a
        stateless nftables rule: its data connections in flight are untouched. Every rule names
        a1's address for g1: both agents connect from 127.0.0.1, and the kernel may give a2's
        connection to g1's other address the same source port as a1's control connection (a
        30-minute run once dropped a2's data connection that way, and its client failed)."""
        line = [l for l in self.procs["g1"].log_text().splitlines()
                if "agent connected (" in l and "agent=soak-a1" in l][-1]
        port = int(re.search(r"peer=[\d.]+:(\d+)", line).group(1))
        f = self.fault("cut-control", f"a1-g1 (source port {port}, drop)", gws=(0,))
        before = self.joins()
        cp = G_CONTROL_PORT[0]
        rules = f"""table inet soak_cut {{
  chain output {{ type filter hook output priority -10; policy accept;
    ip daddr {A1_TO_G1} tcp dport {cp} tcp flags & (syn | ack) == syn drop
    ip daddr {A1_TO_G1} tcp sport {port} tcp dport {cp} drop
    ip saddr {A1_TO_G1} tcp sport {cp} tcp dport {port} drop
  }}
}}
"""
        run(["nft", "-f", self.write("cut.nft", rules)])
        await asyncio.sleep(hold)
        run(["nft", "delete", "table", "inet", "soak_cut"])
        await self.heal(f, lambda: self.wait_served(["a1"], ["g1"], before))

    async def f_delay(self, hold, ms):
        f = self.fault("delay", f"{ms} ms each way on both agents' paths to g2", gws=(1,))
        self.write("delay_ms", f"{ms}\n")
        await asyncio.sleep(hold)
        self.write("delay_ms", "0\n")
        self.end_fault(f)

    async def f_stall(self, hold, warmup=False):
        f = self.fault("stall-readers", f"4 clients read nothing for {hold:.0f} s" + (" (warm-up)" if warmup else ""))
        tasks = [asyncio.ensure_future(self.echo_client(0, 8 << 20, stall_reader=hold)),
                 asyncio.ensure_future(self.echo_client(1, 8 << 20, stall_reader=hold)),
                 asyncio.ensure_future(self.http_client(0, 8 << 20, stall_reader=hold)),
                 asyncio.ensure_future(self.http_client(1, 8 << 20, stall_reader=hold))]
        await asyncio.gather(*tasks)
        self.end_fault(f)

    async def f_kill_agent(self, down):
        f = self.fault("kill-agent", "a2 (SIGKILL)", causes=LOST_IN_FLIGHT, at_start_only=True)
        before = self.joins()
        self.procs["a2"].stop(signal.SIGKILL)
        await asyncio.sleep(down)
        self.procs["a2"].start()
        self.restarted_at["a2"].append(now())
        await self.heal(f, lambda: self.wait_served(["a2"], ["g1", "g2"], before))

    async def f_kill_gateway(self, down):
        f = self.fault("kill-gateway", "g2 (SIGKILL)", gws=(1,), causes=LOST_IN_FLIGHT + ("refused",))
        before = self.joins()
        self.procs["g2"].stop(signal.SIGKILL)
        await asyncio.sleep(down)
        self.procs["g2"].start()
        self.restarted_at["g2"].append(now())
        await self.heal(f, lambda: self.wait_served(["a1", "a2"], ["g2"], before))

    async def f_restart_backend(self, name):
        proto = {"echo": ("echo", "dyn"), "nginx": ("http",)}[name]
        f = self.fault("restart-backend", f"{name} (SIGKILL, start again)", protos=proto,
                       causes=LOST_IN_FLIGHT)
        self.procs[name].stop(signal.SIGKILL)
        await asyncio.sleep(0.5)
        self.procs[name].start()
        port = BACKEND_PORTS["echo" if name == "echo" else "http"]
        await self.heal(f, lambda: wait_for(f"{name} listening", lambda: port_accepts(BACKEND_IP, port), 10))

    async def f_reload(self, add):
        """SIGHUP config change adding or removing the "dyn" listener, as docs/protocol.md 7.9
        says for a site with two agents: one agent after the other (the first is refused until
        the second has the same config)."""
        what = "add" if add else "remove"
        f = self.fault("sighup", f"{what} listener dyn (a1, then a2)", protos=("dyn",),
                       causes=("refused", "empty"))
        if not add:
            self.dyn_open = False
            await wait_for("dyn clients to finish",
                           lambda: not any(r["proto"] == "dyn" for r in self.inflight.values()), 60)
        before = self.joins()
        self.write_agent_configs(dyn=add)
        self.procs["a1"].send(signal.SIGHUP)
        await asyncio.sleep(1.0)
        self.procs["a2"].send(signal.SIGHUP)

        async def settled():
            await self.wait_served(["a1"], ["g1", "g2"], before)
            if add:
                await wait_for("dyn open on both gateways",
                               lambda: all(echo_ok(G_PUBLIC[g], PORTS["dyn"]) for g in (0, 1)), 20)
            else:
                await wait_for("dyn closed on both gateways",
                               lambda: not any(port_accepts(G_PUBLIC[g], PORTS["dyn"]) for g in (0, 1)), 20)
        await self.heal(f, settled)
        self.dyn_open = add

    async def heal(self, f, waiter):
        try:
            await waiter()
        except RuntimeError as e:
            self.problems.append(f"{f['kind']} {f['target']} at {f['t0']:.1f}s did not heal: {e}")
            log(f"PROBLEM: {self.problems[-1]}")
        self.end_fault(f)

    def set_small_buffers(self, on, note=""):
        values = SMALL_BUFFERS if on else self.default_buffers
        for key, v in values.items():
            run(["sysctl", "-qw", f"{key}={v}"])
        self.small_bufs = on
        if on:
            self.small_fault = self.fault("small-buffers", "tcp_rmem/tcp_wmem " + SMALL_BUFFERS["net.ipv4.tcp_wmem"]
                                          + (f" ({note})" if note else ""))
        else:
            self.end_fault(self.small_fault)

    async def chaos(self, start, end):
        s = self.short
        plan = [
            lambda: self.f_cut_control(2.0 if s else 5.0),
            lambda: self.f_delay(3.0 if s else 10.0, 40),
            lambda: self.f_stall(3.0 if s else 10.0),
            lambda: self.f_kill_agent(1.0),
            lambda: self.f_reload(add=True),
            lambda: self.f_kill_gateway(1.0),
            lambda: self.f_restart_backend("echo"),
            lambda: self.f_reload(add=False),
            lambda: self.f_restart_backend("nginx"),
        ]
        gap = 1.0 if s else 15.0
        await asyncio.sleep(max(0.0, start - now()))
        i = 0
        while now() < end:
            await plan[i % len(plan)]()
            i += 1
            if i % len(plan) == 0 and not s:
                await self.quiet_point(f"after cycle {i // len(plan)}")
            await asyncio.sleep(gap)
        if self.dyn_open:
            await self.f_reload(add=False)

    async def buffers(self, start, end):
        await asyncio.sleep(max(0.0, start - now()))
        self.set_small_buffers(True)
        await asyncio.sleep(max(0.0, end - now()))
        self.set_small_buffers(False)

    # -------------------------------------------------------------------- the run
    async def main(self):
        self.small_bufs = False
        self.default_buffers = {k: run(["sysctl", "-n", k]).stdout.strip().replace("\t", " ")
                                for k in SMALL_BUFFERS}
        self.stall_s = 15.0
        log(f"work directory {self.work}; duration {self.duration:.0f} s")
        self.setup()
        await self.start_all()
        self.t_started = now()
        log("two gateways, two agents, three backends and the delay relay are up")
        sampler = asyncio.ensure_future(self.sampler())
        workers = [asyncio.ensure_future(self.worker(k))
                   for k in ["mixed"] * MIXED_WORKERS + ["long", "sftp", "dyn"]]
        # The warm-up sees every kind of load once (long transfers run from the start, plus a
        # burst of zero-window readers), so the baseline holds what a warm process keeps.
        warmup = min(12.0, self.duration * 0.2) if self.short else 60.0
        # Small socket buffers too, long enough for the long transfers to overlap in them: with
        # more bytes and connections in flight at once the heap peaks higher, and glibc keeps
        # the freed memory (its "kept free" figure) for reuse instead of returning it, so RSS
        # steps up once, in the warm-up, while the allocated heap comes back down.
        await asyncio.sleep(1.0)
        await self.f_stall(3.0, warmup=True)
        self.set_small_buffers(True, "warm-up")
        await asyncio.sleep(3.0 if self.short else 30.0)
        self.set_small_buffers(False)
        await asyncio.sleep(max(0.0, warmup - now() + self.t_started))
        await self.quiet_point("baseline (after warm-up)")
        t_faults = now()
        run_end = t_faults + self.duration - warmup
        bufs = asyncio.ensure_future(self.buffers(t_faults + 0.35 * (run_end - t_faults),
                                                  t_faults + 0.70 * (run_end - t_faults)))
        await self.chaos(t_faults + 1.0, run_end - (3.0 if self.short else 30.0))
        await asyncio.sleep(max(0.0, run_end - now()))
        await bufs
        log("run over: no new clients; waiting for the running ones")
        self.stop_new = True
        try:
            await wait_for("running clients to finish", lambda: not self.inflight, 60)
        except RuntimeError:
            for rec in list(self.inflight.values()):
                self.finish(rec, "stall", "still running 60 s after the end of the run")
        for w in workers:
            w.cancel()
        await self.quiet_point("final")
        sampler.cancel()

    def stop_all(self):
        for p in self.procs.values():
            try:
                p.stop()
            except Exception:  # noqa: BLE001
                pass


# ------------------------------------------------------------------------------ workload shape
# Many short, a few long: (size, weight). One long transfer (64 MiB) runs at any time.
SHORT_SIZES = [(1, 10), (1000, 25), (4096, 15), (65536, 20), (1 << 20, 15), (8 << 20, 5)]
LONG_SIZE = 64 << 20
HTTP_SIZES = [1, 1000, 4096, 65536, 1 << 20, 8 << 20, 64 << 20]
SFTP_WEIGHTS = [(1000, 3), (1 << 20, 3), (8 << 20, 2), (20 << 20, 1)]
SFTP_SIZES = [s for s, _ in SFTP_WEIGHTS]
MIXED_WORKERS = 8
SMALL_BUFFERS = {"net.ipv4.tcp_rmem": "4096 16384 65536", "net.ipv4.tcp_wmem": "4096 16384 65536"}
# What a client in flight can suffer from a process dying under it (or its backend).
LOST_IN_FLIGHT = ("reset", "truncated", "empty", "sftp-lost")


def pick(rng, weighted):
    total = sum(w for _, w in weighted)
    x = rng.uniform(0, total)
    for v, w in weighted:
        x -= w
        if x <= 0:
            return v
    return weighted[-1][0]


def classify(e, rec):
    if isinstance(e, ConnectionRefusedError):
        return "refused", str(e)
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset", f"{type(e).__name__} after {rec['got']} B"
    if isinstance(e, asyncio.IncompleteReadError):
        return ("empty" if rec["got"] == 0 else "truncated"), f"{rec['got']} B"
    if isinstance(e, asyncio.TimeoutError):
        return "stall", f"no byte for 15 s after {rec['got']} of {rec['size']} B"
    return "error", f"{type(e).__name__}: {e}"


def sftp_cause(line):
    low = line.lower()
    if "connection refused" in low:
        return "refused"
    return "sftp-lost"


def close(writer):
    if writer is not None:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------------------ verdict
def explain(soak):
    """Gives each failed client the fault that explains it, or none."""
    end = now()
    for rec in soak.clients:
        if rec["ok"] or rec["cause"] == "corrupt":
            continue
        rec["explained_by"] = None
        for f in soak.faults:
            if rec["cause"] not in f["causes"] or rec["gw"] not in f["gws"] or rec["proto"] not in f["protos"]:
                continue
            t1 = f["t1"] if f["t1"] is not None else end
            if f["at_start_only"]:
                # Lost only if in flight when the process died (or offered to it just before
                # its peers noticed: three heartbeats).
                hit = rec["t0"] <= f["t0"] + 3 * HEARTBEAT_S + 0.5 and rec["t1"] >= f["t0"]
            else:
                hit = rec["t0"] <= t1 + 1.0 and rec["t1"] >= f["t0"]
            if hit:
                rec["explained_by"] = f"{f['kind']} {f['target']} at {f['t0']:.1f}s"
                f["explained"] += 1
                break


def leak_check(soak):
    """Compares every later quiet point with the baseline for the daemons never restarted."""
    findings, rows = [], []
    base = soak.quiet[0]
    for q in soak.quiet[1:]:
        for d in DAEMONS:
            b, x = base.get(d), q.get(d)
            if not b or not x:
                continue
            restarted = b["pid"] != x["pid"]
            rows.append((q["label"], d, b, x, restarted))
            if x["close_wait"] > b["close_wait"]:
                findings.append(f"{d}: CLOSE-WAIT {b['close_wait']} -> {x['close_wait']} at {q['label']}")
            if restarted:
                continue  # a fresh process: its figures are not comparable with the baseline
            bf, xf = b["fds"] - b["pipes"], x["fds"] - x["pipes"]
            if xf > max(bf * 1.10, bf + 4):
                findings.append(f"{d}: descriptors (without pipes) {bf} -> {xf} at {q['label']}")
            if x["rss_kib"] > b["rss_kib"] * 1.10:
                findings.append(f"{d}: RSS {b['rss_kib']} -> {x['rss_kib']} KiB at {q['label']}")
            if "heap_kib" in b and "heap_kib" not in x:
                findings.append(f"{d}: no heap figures from /metrics at {q['label']}")
            elif "heap_kib" in b:
                # The TLS session cache is bounded (256 sessions) and fills as the run goes:
                # judged apart from the rest of the heap, which must stay level.
                bh, xh = b["heap_kib"] - b.get("sessions_kib", 0), x["heap_kib"] - x.get("sessions_kib", 0)
                if xh > max(bh * 1.10, bh + 256):
                    findings.append(f"{d}: heap allocated (without TLS sessions) {bh} -> {xh} KiB at {q['label']}")
            if x["estab"] > max(b["estab"] * 1.10, b["estab"] + 4):
                findings.append(f"{d}: ESTABLISHED {b['estab']} -> {x['estab']} at {q['label']}")
    return findings, rows


def report(soak, elapsed):
    explain(soak)
    clients = soak.clients
    ok = [c for c in clients if c["ok"]]
    failed = [c for c in clients if not c["ok"]]
    corrupt = sum(c["bad"] for c in clients)
    unexplained = [c for c in failed if c["cause"] == "corrupt" or not c.get("explained_by")]
    leaks, rows = leak_check(soak)
    moved = sum(c["got"] for c in clients)
    by = {}
    for c in failed:
        key = (c["cause"], c.get("explained_by") or "UNEXPLAINED")
        by[key] = by.get(key, 0) + 1
    L = []
    L.append(f"# bench/soak: {soak.duration:.0f} s of churn and faults ({elapsed:.0f} s with setup and drain)\n")
    L.append(f"- data connections: {'plaintext (--plain)' if soak.args.plain else 'TLS (the default)'}; seed {soak.args.seed}")
    L.append(f"- t = 0 s is {time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(T0_WALL))}"
             f".{int(T0_WALL % 1 * 1000):03d}Z in the daemons' logs")
    L.append(f"- clients: {len(clients)} ({len(ok)} ok, {len(failed)} failed); "
             + ", ".join(f"{p} {sum(1 for c in clients if c['proto'] == p)}" for p in ("echo", "http", "ssh", "dyn"))
             + f"; {moved / (1 << 30):.2f} GiB received and compared")
    L.append(f"- **corrupted bytes: {corrupt}**")
    L.append(f"- **unexplained failures: {len(unexplained)}**")
    L.append(f"- faults: {len(soak.faults)}; did not heal: {len(soak.problems)}")
    L.append(f"- leak check at quiet points: {'no finding' if not leaks else '; '.join(leaks)}\n")
    L.append("## Failed clients by cause\n")
    L.append("| cause | explained by | clients |\n|---|---|---|")
    for (cause, why), n in sorted(by.items(), key=lambda kv: -kv[1]):
        L.append(f"| {cause} | {why} | {n} |")
    if not by:
        L.append("| - | - | 0 |")
    L.append("\n## Faults\n")
    L.append("| at | kind | target | lasted | failures explained |\n|---|---|---|---|---|")
    for f in soak.faults:
        lasted = f"{f['t1'] - f['t0']:.1f} s" if f["t1"] is not None else "-"
        L.append(f"| {f['t0']:.1f} s | {f['kind']} | {f['target']} | {lasted} | {f['explained']} |")
    if soak.problems:
        L.append("\n## Did not heal / harness problems\n")
        L += [f"- {p}" for p in soak.problems]
    if unexplained:
        L.append("\n## Unexplained failures\n")
        L.append("| id | at | proto | gateway | client port | size | cause | detail | small buffers | faults in flight |\n|---|---|---|---|---|---|---|---|---|---|")
        for c in unexplained[:60]:
            active = [f"{f['kind']}" for f in soak.faults
                      if f["t0"] <= c["t1"] and (f["t1"] is None or f["t1"] + 1 >= c["t0"])]
            L.append(f"| {c['id']} | {c['t0']:.1f}-{c['t1']:.1f} s | {c['proto']} | g{c['gw'] + 1} | {c.get('port', '-')} | {c['size']} "
                     f"| {c['cause']} | {c['detail']}{' (' + c['snapshot'] + ')' if c.get('snapshot') else ''} | {'yes' if c['small_bufs'] else 'no'} | {', '.join(active) or 'none'} |")
        if len(unexplained) > 60:
            L.append(f"\n({len(unexplained) - 60} more in clients.jsonl)")
    L.append("\n## Daemons at quiet points (no client running, 2 s settled)\n")
    L.append("| point | daemon | pid | descriptors (of which splice pipes) | RSS MiB | heap allocated MiB (of which TLS sessions) | heap kept free MiB | ESTABLISHED | CLOSE-WAIT |\n|---|---|---|---|---|---|---|---|---|")
    for q in soak.quiet:
        for d in DAEMONS:
            x = q.get(d)
            if x:
                heap = (f"{x['heap_kib'] / 1024:.2f} ({x.get('sessions_kib', 0) / 1024:.2f}) | {x['heap_free_kib'] / 1024:.2f}"
                        if "heap_kib" in x else "? | ?")
                L.append(f"| {q['label']} | {d} | {x['pid']} | {x['fds']} ({x['pipes']}) | {x['rss_kib'] / 1024:.1f} | {heap} | {x['estab']} | {x['close_wait']} |")
    tw = [s["time_wait"] for s in soak.samples]
    if tw:
        peak = {k: max(t.get(k, 0) for t in tw) for k in ("g1", "g2", "agents", "others")}
        L.append("\nTIME-WAIT sockets, peak during the run: " + ", ".join(f"{k} {v}" for k, v in peak.items()))
    thr = [s["mib_s"] for s in soak.samples if "mib_s" in s]
    if thr:
        L.append(f"\nThroughput (bytes received and compared by clients): mean {sum(thr) / len(thr):.1f} MiB/s, "
                 f"max {max(thr):.1f} MiB/s")
    good = corrupt == 0 and not unexplained and not leaks and not soak.problems and len(ok) > 0
    L.append(f"\n**Verdict: {'PASS' if good else 'FAIL'}**")
    return "\n".join(L) + "\n", good


def plot(soak, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = soak.samples
    t = [r["t"] for r in s]
    fig, ax = plt.subplots(4, 1, figsize=(13, 11), sharex=True)
    colors = {"g1": "tab:blue", "g2": "tab:cyan", "a1": "tab:red", "a2": "tab:orange"}

    def series(d, key, scale=1.0):
        return [(r[d][key] / scale) if r.get(d) else float("nan") for r in s]

    for d in DAEMONS:
        ax[0].plot(t, series(d, "rss_kib", 1024), label=d, color=colors[d])
        heap = [(r[d]["heap_kib"] / 1024, r["t"]) for r in s if r.get(d) and "heap_kib" in r[d]]
        if heap:
            ax[0].plot([h[1] for h in heap], [h[0] for h in heap], label=f"{d} heap allocated",
                       color=colors[d], ls=":", lw=1)
        ax[1].plot(t, series(d, "fds"), label=d, color=colors[d])
        ax[2].plot(t, series(d, "estab"), label=f"{d} ESTABLISHED", color=colors[d], lw=0.8)
        cw = series(d, "close_wait")
        if any(v and v == v for v in cw):
            ax[2].plot(t, cw, label=f"{d} CLOSE-WAIT", color=colors[d], ls="--")
    ax[2].plot(t, [r["active"] for r in s], label="clients in flight", color="black", lw=1.5)
    ax[3].plot(t, [r.get("mib_s", 0) for r in s], color="tab:green")
    ax[0].set_ylabel("RSS; heap allocated (MiB)")
    ax[1].set_ylabel("open descriptors")
    ax[2].set_ylabel("connections")
    ax[3].set_ylabel("MiB/s compared")
    ax[3].set_xlabel("seconds")
    for a in ax[:3]:
        a.legend(loc="upper left", fontsize=7, ncol=4)
    fault_colors = {"cut-control": "red", "delay": "purple", "stall-readers": "brown", "kill-agent": "orange",
                    "kill-gateway": "blue", "restart-backend": "green", "sighup": "gray", "small-buffers": "gold"}
    for f in soak.faults:
        t1 = f["t1"] if f["t1"] is not None else t[-1]
        for a in ax:
            a.axvspan(f["t0"], max(t1, f["t0"] + 0.3), color=fault_colors.get(f["kind"], "gray"),
                      alpha=0.08 if f["kind"] == "small-buffers" else 0.25, lw=0)
        ax[0].annotate(f["kind"], (f["t0"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                       fontsize=7, va="top", ha="right")
    for q in soak.quiet:
        for a in ax:
            a.axvline(q["t"], color="black", ls=":", lw=0.8)
    fails = [c for c in soak.clients if not c["ok"]]
    if fails:
        ax[3].scatter([c["t1"] for c in fails], [0] * len(fails), marker="x",
                      color=["black" if c.get("explained_by") else "red" for c in fails], zorder=5,
                      label="failed client (red: unexplained)")
        ax[3].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"bench/soak, {soak.duration:.0f} s: shaded = faults (gold: small socket buffers), dotted = quiet points")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def inside(args):
    soak = Soak(args)
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(soak.main())
    except Exception as e:  # noqa: BLE001
        soak.problems.append(f"harness: {type(e).__name__}: {e}")
        log(f"PROBLEM: {soak.problems[-1]}")
    finally:
        soak.stop_all()
    text, good = report(soak, time.monotonic() - started)
    out = soak.out
    with open(f"{out}/summary.md", "w") as f:
        f.write(text)
    with open(f"{out}/clients.jsonl", "w") as f:
        for c in soak.clients:
            f.write(json.dumps(c) + "\n")
    with open(f"{out}/samples.jsonl", "w") as f:
        for r in soak.samples + soak.quiet:
            f.write(json.dumps(r) + "\n")
    with open(f"{out}/faults.json", "w") as f:
        json.dump(soak.faults, f, indent=1)
    for p in soak.procs.values():
        shutil.copy(p.log_path, f"{out}/{p.name}.log") if os.path.exists(p.log_path) else None
    if not args.no_plot:
        try:
            plot(soak, f"{out}/soak.png")
        except Exception as e:  # noqa: BLE001
            text += f"\n(plot failed: {e})\n"
    print(text)
    log(f"figures, logs and soak.png in {out}")
    if args.keep:
        log(f"work directory kept: {soak.work}")
    else:
        shutil.rmtree(soak.work, ignore_errors=True)
    return 0 if good else 1


def outside(args, argv):
    """Creates the namespace, runs the soak inside it, ends whatever is left in it by PID."""
    ns = f"spsoak{os.getpid()}"
    run(["ip", "netns", "add", ns])
    try:
        child = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                                "--inside", *argv])
        return child.returncode
    finally:
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:  # only processes in the soak's own namespace: it started them
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "del", ns], check=False)


def main():
    p = argparse.ArgumentParser(description="Sallyport chaos soak (see bench/README.md)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--out", default=None)
    p.add_argument("--sallyport", required=True)
    p.add_argument("--loadgen", required=True)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--plain", action="store_true", help="plaintext data connections (data_tls = false)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "soak")
    args.out = os.path.abspath(args.out)
    args.sallyport, args.loadgen = os.path.abspath(args.sallyport), os.path.abspath(args.loadgen)
    if args.inside:
        sys.exit(inside(args))
    argv = [a for a in argv]
    argv += ["--out", args.out, "--sallyport", args.sallyport, "--loadgen", args.loadgen]
    sys.exit(outside(args, argv))


if __name__ == "__main__":
    main()
