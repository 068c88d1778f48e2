"""xDS interop: one management server (sluice-testkit's xds-server, the
same published Envoy types as sluice) drives a grpcio proxyless client
(`xds:///svc`, GRPC_XDS_BOOTSTRAP) and sluice (the same bootstrap); for
the same snapshot both reach the same backends, and both follow an update.

    .ci/interop              (creates its own venv with grpcio)
    python3 interop/xds_interop.py SLUICE XDS_SERVER

Exits non-zero if any check fails.
"""
import json, os, re, subprocess, sys, tempfile, time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLUICE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, 'target', 'debug', 'sluice')
XDS_SERVER = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, 'target', 'debug', 'xds-server')
GEN = tempfile.mkdtemp(prefix='sluice-xds-interop-')
from grpc_tools import protoc
if protoc.main(['protoc', f'-I{ROOT}/testkit/proto', f'--python_out={GEN}', f'--grpc_python_out={GEN}',
                f'{ROOT}/testkit/proto/echo.proto']) != 0:
    sys.exit('protoc failed')
sys.path.insert(0, GEN)
import grpc
import echo_pb2 as pb, echo_pb2_grpc as rpc

LIMIT = 20.0  # seconds any one wait may take


class Echo(rpc.EchoServicer):
    """Answers a unary call with its own address as initial metadata."""
    def __init__(self):
        self.addr = None

    def Unary(self, req, ctx):
        ctx.send_initial_metadata((('x-served-by', self.addr),))
        return pb.Reply(payload=req.payload, seq=req.seq)


def backend():
    echo = Echo()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    rpc.add_EchoServicer_to_server(echo, server)
    port = server.add_insecure_port('127.0.0.1:0')
    echo.addr = f'127.0.0.1:{port}'
    server.start()
    return server, echo.addr


def read_line(proc, pattern, what):
    deadline = time.time() + LIMIT
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f'{what} exited before logging {pattern!r}')
        m = re.search(pattern, line)
        if m:
            return m
    sys.exit(f'{what} did not log {pattern!r} in time')


ok = total = 0


def check(name, cond):
    global ok, total
    print(('PASS ' if cond else 'FAIL ') + name, flush=True)
    ok += bool(cond)
    total += 1


def served_by(stub, n):
    """The backends n unary calls reached (None for a failed call)."""
    seen = []
    for i in range(n):
        try:
            _, call = stub.Unary.with_call(pb.Req(seq=i), timeout=5)
            seen.append(dict(call.initial_metadata()).get('x-served-by'))
        except grpc.RpcError as e:
            seen.append(None)
            print(f'  call failed: {e.code()} {e.details()}', flush=True)
    return seen


def until(stub, want, what):
    """Calls until every one of 20 in a row reaches only `want`."""
    deadline = time.time() + LIMIT
    while time.time() < deadline:
        got = served_by(stub, 20)
        if set(got) == want:
            return got
        time.sleep(0.1)
    return served_by(stub, 20)


(sa, a), (sb, b) = backend(), backend()
plane = subprocess.Popen([XDS_SERVER, 'svc', 'cluster-1', f'{a},{b}'], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
plane_addr = read_line(plane, r'xds server listening on (\S+)', 'xds-server').group(1)
bootstrap = os.path.join(GEN, 'bootstrap.json')
with open(bootstrap, 'w') as f:
    json.dump({
        'xds_servers': [{'server_uri': plane_addr, 'channel_creds': [{'type': 'insecure'}],
                         'server_features': ['xds_v3']}],
        'node': {'id': 'interop', 'cluster': 'interop', 'locality': {'zone': 'z'}},
    }, f)
os.environ['GRPC_XDS_BOOTSTRAP'] = bootstrap

sluice = subprocess.Popen([SLUICE, '--listen', '127.0.0.1:0', '--admin', 'off', '--xds-bootstrap', bootstrap],
                          stderr=subprocess.PIPE, text=True)
sluice_addr = read_line(sluice, r'listening on (\S+)', 'sluice').group(1)

proxyless_ch = grpc.insecure_channel('xds:///svc')
# Through sluice, the application dials sluice with the service's name.
through_ch = grpc.insecure_channel(sluice_addr, options=[('grpc.default_authority', 'svc')])
try:
    proxyless = rpc.EchoStub(proxyless_ch)
    through = rpc.EchoStub(through_ch)

    both = {a, b}
    direct = served_by(proxyless, 40)
    check(f'proxyless grpcio reaches {sorted(set(direct))}', set(direct) == both)
    proxied = served_by(through, 40)
    check(f'sluice reaches {sorted(set(proxied))}', set(proxied) == both)

    # An update: only b. Both follow it.
    plane.stdin.write(f'{b}\n')
    plane.stdin.flush()
    read_line(plane, r'version (\d+)', 'xds-server')
    got = until(proxyless, {b}, 'proxyless')
    check(f'after the update proxyless reaches {sorted(set(got))}', set(got) == {b})
    got = until(through, {b}, 'sluice')
    check(f'after the update sluice reaches {sorted(set(got))}', set(got) == {b})
finally:
    proxyless_ch.close()
    through_ch.close()
    sluice.terminate()
    plane.terminate()
    sa.stop(0)
    sb.stop(0)
    try:
        code = sluice.wait(10)
    except subprocess.TimeoutExpired:
        sluice.kill()
        code = None
check(f'sluice exits 0 on SIGTERM (got {code})', code == 0)
print(f'{ok}/{total} passed')
sys.exit(0 if ok == total else 1)
