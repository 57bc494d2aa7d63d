"""Calls the CSI plugin on a Unix socket with Python's grpcio (gRPC's C core) and its DEFAULT
channel options: no grpc.default_authority, so the C core sends its own :authority for a unix:
target (the socket's path, percent-encoded). Used by tests/csi_grpcio.rs.

Usage: client.py SOCKET. Prints `grpcio VERSION`, then one line per call:
`METHOD CODE DETAIL`, DETAIL being the reply's bytes in hex when CODE is OK, else the
status message. Messages are raw protobuf bytes (no generated stubs): an empty message is b''.
"""
import sys

import grpc

CALLS = [
    ("/csi.v1.Identity/GetPluginInfo", b""),
    ("/csi.v1.Identity/Probe", b""),
    # A CreateVolumeRequest without a name: INVALID_ARGUMENT, from the controller itself.
    ("/csi.v1.Controller/CreateVolume", b""),
]


def main():
    print("grpcio", grpc.__version__, flush=True)
    with grpc.insecure_channel("unix://" + sys.argv[1]) as channel:
        for method, request in CALLS:
            call = channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            try:
                reply = call(request, timeout=30)
                print(method, "OK", reply.hex(), flush=True)
            except grpc.RpcError as e:
                print(method, e.code().name, e.details(), flush=True)


if __name__ == "__main__":
    main()
