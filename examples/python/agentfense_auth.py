"""API keys for the published AgentFense Python SDK (agentfense==0.2.1), unchanged.

The SDK cannot send headers, so an authenticated server needs the key added to each call.
Copy this file next to your code, then either:

    import agentfense_auth
    agentfense_auth.use_api_key(os.environ["AGENTFENSE_API_KEY"])   # every client from now on
    with Sandbox.from_local("./project", preset="agent-safe", endpoint="sandbox.internal:9000",
                            secure=True) as sb:
        print(sb.run("ls").stdout)

or build one client explicitly:

    client = agentfense_auth.authed_client("sandbox.internal:9000", key, secure=True)

Local users need neither: the server's unix socket (endpoint="unix:///path/agentfense.sock")
identifies them by their uid.
"""

import grpc
from agentfense import client as _client
from agentfense._gen import codebase_pb2_grpc, sandbox_pb2_grpc


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key):
        self._header = ("authorization", "Bearer " + key.strip())

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _wrap(client, key):
    client._channel = grpc.intercept_channel(client._channel, _Bearer(key))
    client._sandbox_stub = sandbox_pb2_grpc.SandboxServiceStub(client._channel)
    client._codebase_stub = codebase_pb2_grpc.CodebaseServiceStub(client._channel)
    return client


def authed_client(endpoint, key, secure=False):
    """A SandboxClient whose every call carries `key`."""
    return _wrap(_client.SandboxClient(endpoint=endpoint, secure=secure), key)


_original_init = _client.SandboxClient.__init__


def use_api_key(key):
    """Makes every SandboxClient created from now on (including the ones Sandbox.from_local
    and Sandbox.from_codebase create) carry `key`."""

    def __init__(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        _wrap(self, key)

    _client.SandboxClient.__init__ = __init__
