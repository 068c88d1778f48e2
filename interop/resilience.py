"""Resilience through the real sluice binary with grpcio peers (issue 21):
grpcio servers that fail of their own accord behind routes with retry,
hedge, fault, rate limit, max_stream_age and outlier detection, driven
by grpcio clients.

    python3 interop/resilience.py [path/to/sluice]

Exits non-zero if any check fails; prints the hedging latency figures.
"""
import os, sys, time, threading, subprocess, re, tempfile, json
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLUICE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, 'target', 'debug', 'sluice')
GEN = tempfile.mkdtemp(prefix='sluice-resilience-')
from grpc_tools import protoc
if protoc.main(['protoc', f'-I{ROOT}/testkit/proto', f'--python_out={GEN}', f'--grpc_python_out={GEN}',
                f'{ROOT}/testkit/proto/echo.proto']) != 0:
    sys.exit('protoc failed')
sys.path.insert(0, GEN)
import grpc
import echo_pb2 as pb, echo_pb2_grpc as rpc


class Faulty(rpc.EchoServicer):
    """An echo server that fails every `fail_every`-th unary call (or all),
    stalls every `stall_every`-th one, and says who it is."""
    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.calls = 0
        self.streams = 0
        self.fail_every = 0
        self.fail_all = False
        self.stall_every = 0
        self.stall_s = 0.0

    def Unary(self, req, ctx):
        with self.lock:
            n = self.calls
            self.calls += 1
        if self.stall_every and n % self.stall_every == self.stall_every - 1:
            time.sleep(self.stall_s)
        if self.fail_all or (self.fail_every and n % self.fail_every == 0):
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f'{self.name} fails')
        ctx.set_trailing_metadata((('x-served-by', self.name),))
        return pb.Reply(seq=req.seq, payload=req.payload)

    def ServerStream(self, req, ctx):
        with self.lock:
            self.streams += 1
        ctx.send_initial_metadata((('x-served-by', self.name),))
        for i in range(req.replies):
            if req.delay_ms:
                time.sleep(req.delay_ms / 1000)
            yield pb.Reply(seq=i)


def serve(name):
    svc = Faulty(name)
    server = grpc.server(futures.ThreadPoolExecutor(32))
    rpc.add_EchoServicer_to_server(svc, server)
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    return svc, server, f'127.0.0.1:{port}'


def sluice(config):
    path = os.path.join(GEN, f'sluice-{time.time_ns()}.toml')
    with open(path, 'w') as f:
        f.write(config)
    proc = subprocess.Popen([SLUICE, '--config', path, '--listen', '127.0.0.1:0', '--admin', 'off'],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r'listening on (\S+)', line)
    if not m:
        sys.exit(f'sluice did not start: {line}')
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, m.group(1)


def group(addrs, extra=''):
    eps = ', '.join(f'"{a}"' for a in addrs)
    return f'[upstreams.g]\nendpoints = [{eps}]\nstrategy = ["random"]\n{extra}\n'


def route(method, policy):
    return f'[[routes]]\nmethod = "/sluice.test.Echo/{method}"\nupstream = "g"\n{policy}\n'


ok = total = 0
def check(name, cond):
    global ok, total
    total += 1
    ok += bool(cond)
    print(('ok   ' if cond else 'FAIL ') + name, flush=True)


a, a_srv, a_addr = serve('a')
b, b_srv, b_addr = serve('b')
c, c_srv, c_addr = serve('c')

# 1. Retry: `a` fails every other call; every call through a retry route
# succeeds, and `a` saw each failed call again.
a.fail_every = 2
proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' + group([a_addr]) +
                    route('Unary', 'retry = { max_attempts = 3, initial_backoff = "10ms" }'))
stub = rpc.EchoStub(grpc.insecure_channel(addr))
failed = 0
for i in range(50):
    try:
        stub.Unary(pb.Req(seq=i), timeout=5)
    except grpc.RpcError:
        failed += 1
check(f'retry: 50 calls to a server failing every other one, {failed} failed, server saw {a.calls}',
      failed == 0 and a.calls == 100)
proc.terminate(); proc.wait(10)
a.fail_every = 0

# 2. Hedging beats a stall: `a` stalls 1 in 10 of its calls for 1 s, `b`
# never does (were both to stall, a hedge could meet a stall of its own).
def latencies(addr, n=200, threads=4):
    out = []
    lock = threading.Lock()
    def worker(k):
        s = rpc.EchoStub(grpc.insecure_channel(addr))
        for i in range(n // threads):
            t = time.time()
            s.Unary(pb.Req(seq=i), timeout=10)
            with lock:
                out.append(time.time() - t)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out.sort()
    return out

a.stall_every = 10
a.stall_s = 1.0
p99 = {}
for name, policy in (('without hedging', ''), ('with hedging', 'hedge = { max_attempts = 2, delay = "50ms" }')):
    proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' + group([a_addr, b_addr]) + route('Unary', policy))
    lat = latencies(addr)
    p99[name] = lat[int(len(lat) * 0.99) - 1]
    print(f'     hedging: p50 {lat[len(lat)//2]*1000:.1f} ms, p99 {p99[name]*1000:.1f} ms {name} '
          f'(1 in 10 of a\'s calls stall 1 s)', flush=True)
    proc.terminate(); proc.wait(10)
check(f'hedging: p99 {p99["with hedging"]*1000:.0f} ms with, {p99["without hedging"]*1000:.0f} ms without',
      p99['with hedging'] < 0.5 and p99['without hedging'] >= 0.9)
a.stall_every = 0

# 3. Fault injection: 30 % aborted over 1,000 calls (±5 points).
proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' + group([a_addr]) +
                    route('Unary', 'fault = { abort_code = "UNAVAILABLE", abort_percent = 30 }'))
stub = rpc.EchoStub(grpc.insecure_channel(addr))
aborted = 0
for i in range(1000):
    try:
        stub.Unary(pb.Req(seq=i), timeout=5)
    except grpc.RpcError as e:
        aborted += e.code() == grpc.StatusCode.UNAVAILABLE and 'fault injected' in (e.details() or '')
check(f'fault: {aborted} of 1000 aborted at 30 %', 250 <= aborted <= 350)
proc.terminate(); proc.wait(10)

# 4. Rate limit: a burst of 5 at 1/s, then RESOURCE_EXHAUSTED.
proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' + group([a_addr]) +
                    route('Unary', 'rate_limit = { rate = 1.0, burst = 5 }'))
stub = rpc.EchoStub(grpc.insecure_channel(addr))
codes = []
for i in range(10):
    try:
        stub.Unary(pb.Req(seq=i), timeout=5)
        codes.append('OK')
    except grpc.RpcError as e:
        codes.append(e.code().name)
check(f'rate limit: {codes}', codes.count('OK') in (5, 6) and 'RESOURCE_EXHAUSTED' in codes)
proc.terminate(); proc.wait(10)

# 5. max_stream_age: a long stream ends UNAVAILABLE at its age; the client
# opens it again and the streams spread over both servers.
proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' + group([a_addr, b_addr]) +
                    route('ServerStream', 'max_stream_age = "1s"'))
service_config = json.dumps({'methodConfig': [{
    'name': [{'service': 'sluice.test.Echo'}],
    'retryPolicy': {'maxAttempts': 3, 'initialBackoff': '0.05s', 'maxBackoff': '0.5s',
                    'backoffMultiplier': 2, 'retryableStatusCodes': ['UNAVAILABLE']}}]})
stub = rpc.EchoStub(grpc.insecure_channel(addr, options=[('grpc.service_config', service_config)]))
ends = []
served = set()
t0 = time.time()
for k in range(8):
    started = time.time()
    call = stub.ServerStream(pb.Req(replies=1000, delay_ms=20), timeout=10)
    got = 0
    try:
        for _ in call:
            got += 1
        ends.append(('OK', got, 0))
    except grpc.RpcError as e:
        ends.append((e.code().name, got, time.time() - started))
        if 'max_stream_age' not in (e.details() or ''):
            ends[-1] = ('wrong message: ' + (e.details() or ''), got, 0)
    served.add(dict(call.initial_metadata()).get('x-served-by'))
good = all(code == 'UNAVAILABLE' and got > 10 and 1.0 <= age < 2.0 for code, got, age in ends)
check(f'max_stream_age: 8 streams ended {sorted(set(e[0] for e in ends))} after '
      f'{min(e[2] for e in ends):.2f}-{max(e[2] for e in ends):.2f} s, resumed on {sorted(served)}',
      good and served == {'a', 'b'})
proc.terminate(); proc.wait(10)

# 6. Outlier detection: `c` fails every call and is ejected within two
# intervals; the others take every call after that.
c.fail_all = True
proc, addr = sluice(f'[upstream]\naddress = "{a_addr}"\n' +
                    group([a_addr, b_addr, c_addr],
                          '[upstreams.g.outlier_detection]\ninterval = "500ms"\nbase_ejection_time = "30s"\n'
                          'max_ejection_percent = 50\n'
                          'failure_percentage = { threshold = 50, minimum_hosts = 3, request_volume = 5 }') +
                    route('Unary', ''))
stub = rpc.EchoStub(grpc.insecure_channel(addr))
t0 = time.time()
first_failure = None
last_c_call = None
seen = c.calls
while time.time() - t0 < 4:
    try:
        stub.Unary(pb.Req(), timeout=5)
    except grpc.RpcError:
        first_failure = first_failure or time.time()
    if c.calls != seen:
        seen = c.calls
        last_c_call = time.time()
    time.sleep(0.005)
ejected_after = (last_c_call - first_failure) if first_failure and last_c_call else None
after = []
for i in range(50):
    try:
        stub.Unary(pb.Req(), timeout=5)
        after.append('OK')
    except grpc.RpcError as e:
        after.append(e.code().name)
check(f'outlier detection: c ejected {ejected_after:.2f} s after its first failure (interval 0.5 s); '
      f'then {after.count("OK")}/50 OK',
      ejected_after is not None and ejected_after < 1.0 and after.count('OK') == 50)
proc.terminate(); proc.wait(10)

for s in (a_srv, b_srv, c_srv):
    s.stop(0)
print(f'{ok} passed, {total - ok} failed')
sys.exit(0 if ok == total else 1)
