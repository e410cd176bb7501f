"""Python socketserver echo peers for socketd's benchmark: the seed's own classes.

usage: pyecho.py threading-tcp|forking-tcp|threading-udp|udp HOST PORT
Prints "ready" once bound, then serves forever (stopped by SIGTERM).
"""
import socketserver
import sys


class StreamEcho(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class DatagramEcho(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


class ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


class ForkingTCP(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024


KINDS = {
    "threading-tcp": (ThreadingTCP, StreamEcho),
    "forking-tcp": (ForkingTCP, StreamEcho),
    "threading-udp": (socketserver.ThreadingUDPServer, DatagramEcho),
    "udp": (socketserver.UDPServer, DatagramEcho),
}

if __name__ == "__main__":
    server_class, handler = KINDS[sys.argv[1]]
    with server_class((sys.argv[2], int(sys.argv[3])), handler) as server:
        print("ready", flush=True)
        server.serve_forever()
