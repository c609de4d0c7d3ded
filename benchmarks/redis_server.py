"""A private redis-server on a free loopback port (never the machine's 6379)."""

import shutil
import socket
import subprocess
import tempfile
import time

from .procs import ProcessGroup, _record_pgid, stop_group


def free_port():
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port
    raise RuntimeError("no free loopback port")


class RedisServer:
    def __init__(self, binary="/usr/bin/redis-server"):
        self.binary = binary
        self.port = None
        self.dir = None
        self.group = None
        self.version = None

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self, timeout=15.0):
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        last_err = None
        for _attempt in range(3):
            self.port = free_port()
            cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", self.dir,
                   "--daemonize", "no", "--protected-mode", "yes",
                   "--maxclients", "10000", "--loglevel", "warning",
                   "--logfile", self.dir + "/redis.log"]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            _record_pgid(proc.pid)
            self.group = ProcessGroup(proc, cmd, self.dir + "/redis.log", "redis-server")
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                if proc.poll() is not None:
                    last_err = "redis-server exited with %s: %s" % (proc.returncode, self.group.log_tail())
                    break
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(64).startswith(b"+PONG"):
                            self.version = self._info_version()
                            return self
                except OSError as e:
                    last_err = str(e)
                time.sleep(0.05)
            stop_group(self.group, grace=1)
        raise RuntimeError("could not start %s: %s" % (self.binary, last_err))

    def _info_version(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            end = time.monotonic() + 2
            while b"redis_version:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk or time.monotonic() > end:
                    break
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return None

    def stop(self):
        if self.group is not None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"SHUTDOWN NOSAVE\r\n")
            except OSError:
                pass
            stop_group(self.group, grace=3)
            self.group = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
