"""Interop smoke test: a Python grpcio server and client through the real
sluice binary, every call type and failure.

    pip install grpcio grpcio-tools
    cargo build && python3 interop/grpcio_smoke.py [path/to/sluice]

Exits non-zero if any check fails. Not part of `cargo test` (it needs pip
packages); the black-box suites drive sluice with grpcio the same way.
"""
import os, sys, time, threading, subprocess, re, socket, tempfile
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLUICE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, 'target', 'debug', 'sluice')
GEN = tempfile.mkdtemp(prefix='sluice-interop-')
from grpc_tools import protoc
if protoc.main(['protoc', f'-I{ROOT}/testkit/proto', f'--python_out={GEN}', f'--grpc_python_out={GEN}',
                f'{ROOT}/testkit/proto/echo.proto']) != 0:
    sys.exit('protoc failed')
sys.path.insert(0, GEN)
import grpc
import echo_pb2 as pb, echo_pb2_grpc as rpc

cancelled = threading.Event()
BIG = [('grpc.max_receive_message_length', 64 << 20), ('grpc.max_send_message_length', 64 << 20)]

class Echo(rpc.EchoServicer):
    def Unary(self, req, ctx):
        if req.fail_code:
            ctx.set_trailing_metadata((('x-trailer', 'tt'), ('x-trailer-bin', b'\x00\xff')))
            ctx.abort(grpc.StatusCode.NOT_FOUND, req.fail_message)
        if req.delay_ms:
            ctx.add_callback(cancelled.set)
            time.sleep(req.delay_ms / 1000)
        md = dict(ctx.invocation_metadata())
        ctx.set_trailing_metadata((('x-seen', md.get('x-custom', '')), ('x-client-id', md.get('x-sluice-client-id', ''))))
        return pb.Reply(payload=req.payload, seq=req.seq)
    def ServerStream(self, req, ctx):
        for i in range(req.replies):
            yield pb.Reply(seq=i, payload=b'r' * req.reply_size)
    def ClientStream(self, it, ctx):
        n = 0; last = b''
        for r in it:
            if r.stop_reading:
                # An upstream that stops reading this upload until the call
                # is cancelled.
                done = threading.Event(); ctx.add_callback(done.set); done.wait(30)
                return pb.Reply()
            n += 1; last = r.payload
        return pb.Reply(seq=n, payload=last)
    def Bidi(self, it, ctx):
        for r in it:
            yield pb.Reply(seq=r.seq, payload=r.payload)

def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p

# Enough workers that handlers the checks leave blocked (3 s sleeps, 4
# unread uploads, stalled streams until their cancel lands) never queue a
# call: the checks measure sluice, not this pool.
server = grpc.server(futures.ThreadPoolExecutor(64), options=BIG)
rpc.add_EchoServicer_to_server(Echo(), server)
up = server.add_insecure_port('127.0.0.1:0'); server.start()
proc = subprocess.Popen([SLUICE, '--listen', '127.0.0.1:0', '--upstream', f'127.0.0.1:{up}', '--admin', 'off'],
                        stderr=subprocess.PIPE, text=True)
line = proc.stderr.readline()
addr = re.search(r'listening on (\S+)', line).group(1)
# Drain sluice's log: an unread pipe fills at 64 KiB and would block
# sluice's logging, and with it the calls, whatever sluice does right.
log_bytes = [0]
def drain():
    for l in proc.stderr:
        log_bytes[0] += len(l)
threading.Thread(target=drain, daemon=True).start()
ch = grpc.insecure_channel(addr, options=BIG)
stub = rpc.EchoStub(ch)
ok = total = 0
def check(name, cond):
    global ok, total
    print(('PASS ' if cond else 'FAIL ') + name); ok += bool(cond); total += 1

r, call = stub.Unary.with_call(pb.Req(payload=b'hi', seq=7), metadata=(('x-custom', 'v1'),))
check('unary + metadata + trailing metadata', r.seq == 7 and dict(call.trailing_metadata()).get('x-seen') == 'v1')
try:
    stub.Unary(pb.Req(fail_code=5, fail_message='nöt fóund ✓'))
    check('error status', False)
except grpc.RpcError as e:
    md = dict(e.trailing_metadata())
    check('error status, unicode message, -bin trailer', e.code() == grpc.StatusCode.NOT_FOUND and e.details() == 'nöt fóund ✓' and md.get('x-trailer-bin') == b'\x00\xff')
n = sum(1 for _ in stub.ServerStream(pb.Req(replies=1000, reply_size=100)))
check('server streaming 1000', n == 1000)
r = stub.ClientStream(iter([pb.Req(payload=bytes([i])) for i in range(50)]))
check('client streaming 50', r.seq == 50)
seqs = [x.seq for x in stub.Bidi(iter([pb.Req(seq=i) for i in range(100)]))]
check('bidi 100 in order', seqs == list(range(100)))
big = bytes(range(256)) * (40 * 1024)  # 10 MiB
r = stub.Unary(pb.Req(payload=big))
check('10 MiB message byte-exact', r.payload == big)
t = time.time()
try:
    stub.Unary(pb.Req(delay_ms=3000), timeout=0.3)
    check('deadline', False)
except grpc.RpcError as e:
    check(f'deadline exceeded in {time.time()-t:.2f}s', e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.time() - t < 1.5)
cancelled.clear()
fut = stub.Unary.future(pb.Req(delay_ms=3000))
time.sleep(0.3); fut.cancel()
check('client cancel reaches the server', cancelled.wait(2))
# Issue #9: readers that stop reading, and an upstream that stops reading an
# upload, must not starve another client of the same upstream.
def served(n, payload=b''):
    other = rpc.EchoStub(grpc.insecure_channel(addr, options=BIG))
    good = 0; errors = {}
    for i in range(n):
        try:
            good += other.Unary(pb.Req(seq=i, payload=payload), timeout=2).seq == i
        except grpc.RpcError as e:
            key = f'{e.code().name}: {e.details()}'
            errors[key] = errors.get(key, 0) + 1
    if errors:
        print(f'  failed calls: {errors}')
    return good
stalled_ch = grpc.insecure_channel(addr, options=BIG)
stalled = [rpc.EchoStub(stalled_ch).ServerStream(pb.Req(replies=512, reply_size=64 << 10)) for _ in range(8)]
for st in stalled:
    next(st)  # flowing; from here on nobody reads
time.sleep(1)  # a stall shows only over time: let every window fill
t = time.time(); good = served(50)
check(f'8 stalled readers: another client served {good}/50 in {time.time()-t:.2f}s', good == 50)
for st in stalled:
    st.cancel()
def uploads():
    yield pb.Req(stop_reading=True)
    while True:
        yield pb.Req(payload=b'u' * (64 << 10))
# grpcio's channels to one target with the same options share one
# connection: the served calls below travel beside the stalled uploads,
# on the connection whose window the uploads hold.
upload_ch = grpc.insecure_channel(addr, options=BIG)
unread = [rpc.EchoStub(upload_ch).ClientStream.future(uploads()) for _ in range(4)]
time.sleep(1)
t = time.time(); good = served(50, b'p' * (128 << 10))
check(f'4 unread uploads: another client served {good}/50 in {time.time()-t:.2f}s', good == 50)
for u in unread:
    u.cancel()
print(f'(sluice logged {log_bytes[0]} bytes so far)')
# Issue #11: TLS in (grpcio's own TLS stack, BoringSSL), h2c out, with a
# client certificate giving an identity, and a route requiring one.
def tls_files():
    from cryptography import x509
    from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime, ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    def pem(obj):
        return obj.public_bytes(serialization.Encoding.PEM)
    def key_pem(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'interop CA')])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    def leaf(name, sans, eku, org=None):
        k = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)] + ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else [])
        c = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_name).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName(sans), critical=False)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
             .sign(ca_key, hashes.SHA256()))
        return pem(c), key_pem(k)
    server = leaf('localhost', [x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))], ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf('client', [x509.UniformResourceIdentifier('spiffe://interop.test/ns/a/sa/client')], ExtendedKeyUsageOID.CLIENT_AUTH, 'os:admin')
    files = {'ca.pem': pem(ca), 'server.pem': server[0], 'server.key': server[1], 'client.pem': client[0], 'client.key': client[1]}
    for name, data in files.items():
        with open(os.path.join(GEN, name), 'wb') as f:
            f.write(data)
    return files
files = tls_files()
tls_conf = os.path.join(GEN, 'tls.toml')
with open(tls_conf, 'w') as f:
    f.write(f'''[server.tls]
cert = "server.pem"
key = "server.key"
client_auth = {{ ca = "ca.pem", mode = "optional" }}
[[routes]]
method = "/sluice.test.Echo/ClientStream"
upstream = "default"
identity = {{ spiffe_trust_domain = "interop.test", roles = ["os:admin"] }}
''')
tls_proc = subprocess.Popen([SLUICE, '--config', tls_conf, '--listen', '127.0.0.1:0', '--upstream', f'127.0.0.1:{up}', '--admin', 'off'],
                            stderr=subprocess.PIPE, text=True)
tls_addr = re.search(r'listening on (\S+)', tls_proc.stderr.readline()).group(1)
threading.Thread(target=lambda: [None for _ in tls_proc.stderr], daemon=True).start()
NAME = [('grpc.ssl_target_name_override', 'localhost')]
anon = rpc.EchoStub(grpc.secure_channel(tls_addr, grpc.ssl_channel_credentials(files['ca.pem']), options=BIG + NAME))
r, call = anon.Unary.with_call(pb.Req(seq=11), metadata=(('x-sluice-client-id', 'spoofed'),))
check('TLS: unary, no client certificate, spoofed id stripped', r.seq == 11 and dict(call.trailing_metadata()).get('x-client-id') == '')
seqs = [x.seq for x in anon.Bidi(iter([pb.Req(seq=i) for i in range(100)]))]
check('TLS: bidi 100 in order', seqs == list(range(100)))
try:
    anon.ClientStream(iter([pb.Req()]), timeout=5)
    check('TLS: identity route refuses an anonymous client', False)
except grpc.RpcError as e:
    check('TLS: identity route refuses an anonymous client with PERMISSION_DENIED', e.code() == grpc.StatusCode.PERMISSION_DENIED)
creds = grpc.ssl_channel_credentials(files['ca.pem'], files['client.key'], files['client.pem'])
mtls = rpc.EchoStub(grpc.secure_channel(tls_addr, creds, options=BIG + NAME))
r, call = mtls.Unary.with_call(pb.Req(seq=12))
check('TLS: client certificate identity reaches the upstream',
      dict(call.trailing_metadata()).get('x-client-id') == 'spiffe://interop.test/ns/a/sa/client')
r = mtls.ClientStream(iter([pb.Req(payload=bytes([i])) for i in range(5)]), timeout=5)
check('TLS: identity route lets the admin through', r.seq == 5)
t = time.time()
try:
    rpc.EchoStub(grpc.insecure_channel(tls_addr)).Unary(pb.Req(), timeout=5)
    check('TLS: h2c client on the TLS port fails', False)
except grpc.RpcError as e:
    check(f'TLS: h2c client on the TLS port fails fast ({e.code().name} in {time.time()-t:.2f}s)', time.time() - t < 3)
tls_proc.terminate(); tls_proc.wait(10)
server.stop(0)
t = time.time()
try:
    stub.Unary(pb.Req(), timeout=5)
    check('upstream down', False)
except grpc.RpcError as e:
    check(f'upstream down -> UNAVAILABLE in {time.time()-t:.3f}s', e.code() == grpc.StatusCode.UNAVAILABLE)
proc.terminate(); rc = proc.wait(10)
check('SIGTERM exit 0', rc == 0)
print(f'{ok} passed, {total - ok} failed')
sys.exit(0 if ok == total else 1)
