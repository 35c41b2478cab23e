"""A TCP forwarder for the `kubernetes` Service: in-cluster clients (kopf's service-account login)
dial https://kubernetes.default.svc:443; the test kubelet's hosts file points that name at a loopback
address of its own, and this forwards the connections to the API server (kube-proxy's job)."""
from __future__ import annotations

import socket
import threading


class TcpForwarder:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server(listen, reuse_port=False)
        self._closed = False
        threading.Thread(target=self._accept, name="kubernetes-svc-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
