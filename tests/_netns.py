"""Hosts made of Linux namespaces, for the two-host cluster test (tests/test_cluster_multinode.py).

Each host is one ``unshare`` of a network, mount, PID and UTS namespace. Inside, before its init
starts, the host gets what separates real machines: its own hostname and ``/etc/hosts``, root's home in ``/etc/passwd``, and a
private ``/tmp``, ``/run``, ``/dev/shm``, ``/home`` and ``/mnt`` (tmpfs, so Ray's ``/tmp/ray``,
sockets and object store, and the SSH user's home, are the host's own). What the hosts share is
mounted on purpose: the site's "NFS" (one directory of the test, at ``/mnt/nfs`` on every host)
and the session's ``LDCT_HOME`` (the built-in data set, at ``/mnt/ldct-home``). The software (the
Python environment, sshd) is the machine's, as an image would be.

The hosts are joined by veth pairs to a bridge that lives in a namespace of its own: nothing is
added to the machine's own network namespace, and no host has a route beyond the test's subnet,
so no packet can leave through the machine's interfaces.

Teardown is by process: ``unshare --kill-child`` takes its host's init with it, the PID namespace
ends with its init (the kernel kills every process in it), and the network and mount namespaces,
veths and mounts go with their last process. ``unshare`` itself dies with the test process
(PR_SET_PDEATHSIG), so even a killed pytest leaves nothing.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil

SUBNET = "10.77.0"
SHARED = "/mnt/nfs"
LDCT_HOME = "/mnt/ldct-home"
HOME = "/home/ldct"


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Host:
    """One namespaced host: ``init`` runs after the private mounts are in place."""

    def __init__(self, name: str, index: int, base: Path, init: str) -> None:
        self.name = name
        self.ip = f"{SUBNET}.{index}"
        self.base = base
        self.dir = base / name
        self.dir.mkdir()
        self.init = init
        self.unshare: subprocess.Popen | None = None
        self.pid = 0
        self.namespaces: dict[str, str] = {}

    def start(self, hosts_file: Path, shared: Path, ldct_home: Path) -> None:
        script = " && ".join(
            [
                f"hostname {self.name}",
                *(f"mount -t tmpfs {self.name}-{d.strip('/')} {d}" for d in ("/run", "/home", "/mnt")),
                "mkdir -m 755 /run/sshd",
                f"mount --bind {hosts_file} /etc/hosts",
                f"mount --bind {self.base / 'passwd'} /etc/passwd",
                f"mkdir -p {SHARED} {LDCT_HOME} {HOME}/tmp",
                # The shares before /tmp is made private: the session's LDCT_HOME lies under /tmp.
                f"mount --bind {shared} {SHARED}",
                f"mount --bind {ldct_home} {LDCT_HOME}",
                *(f"mount -t tmpfs -o mode=1777 {self.name}-tmp {d}" for d in ("/tmp", "/dev/shm")),
                f"exec {self.init}",
            ]
        )
        self.unshare = subprocess.Popen(
            ["unshare", "--net", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "bash", "-c", script],
            stdout=open(self.dir / "init.log", "w"),
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.time() + 20
        while not self.pid:
            children = psutil.Process(self.unshare.pid).children()
            if children:
                self.pid = children[0].pid
            else:
                assert self.unshare.poll() is None and time.time() < deadline, self.log()
                time.sleep(0.05)
        # The namespaces are the host's once its init has entered them: compare with ours.
        while True:
            ns = {k: os.readlink(f"/proc/{self.pid}/ns/{k}") for k in ("net", "mnt", "pid_for_children")}
            if ns["net"] != os.readlink("/proc/self/ns/net"):
                self.namespaces = ns
                break
            assert time.time() < deadline, self.log()
            time.sleep(0.05)

    def log(self) -> str:
        return (self.dir / "init.log").read_text(errors="replace")

    def enter(self, *command: str, env: dict[str, str] | None = None) -> list[str]:
        """A command line that runs ``command`` on this host (all its namespaces)."""
        prefix = ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "-p"]
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        return [*prefix, *command]

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.enter("bash", "-c", script), capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, f"on {self.name}: {script}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def processes(self) -> list[str]:
        return self.sh("ps -eww -o args=", check=False).stdout.splitlines()

    def stop(self) -> None:
        if self.unshare is None or self.unshare.poll() is not None:
            return
        # The init's death ends its PID namespace (the kernel kills the rest) and then unshare,
        # which ignores SIGTERM while it waits for its child.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.unshare.kill()
            self.unshare.wait(timeout=30)


class Network:
    """The hosts, a bridge in a namespace of its own, and the veth pair of each host."""

    def __init__(self, base: Path, shared: Path, ldct_home: Path) -> None:
        self.base = base
        self.shared = shared
        self.ldct_home = ldct_home
        self.hosts: dict[str, Host] = {}
        self.switch = Host("switch", 254, base, "sleep infinity")

    def add(self, name: str, init: str) -> Host:
        host = Host(name, len(self.hosts) + 1, self.base, init)
        self.hosts[name] = host
        return host

    def start(self) -> None:
        hosts_file = self.base / "hosts"
        # root's home is the host's private HOME (ssh expands ~ from passwd, not from $HOME).
        (self.base / "passwd").write_text(
            "".join(
                ":".join([*f.split(":")[:5], HOME, *f.split(":")[6:]]) if f.startswith("root:") else f
                for f in Path("/etc/passwd").read_text().splitlines(keepends=True)
            )
        )
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.ip} {h.name}\n" for h in self.hosts.values())
        )
        self.switch.start(hosts_file, self.shared, self.ldct_home)
        self.switch.sh("ip link set lo up && ip link add br0 type bridge && ip link set br0 up")
        for host in self.hosts.values():
            host.start(hosts_file, self.shared, self.ldct_home)
            subprocess.run(
                ["ip", "link", "add", "eth0", "netns", str(host.pid), "type", "veth",
                 "peer", "name", f"p-{host.name}", "netns", str(self.switch.pid)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            self.switch.sh(f"ip link set p-{host.name} master br0 && ip link set p-{host.name} up")
            # Only the subnet's route: an address outside it has no way out.
            host.sh(f"ip link set lo up && ip addr add {host.ip}/24 dev eth0 && ip link set eth0 up")

    def stop(self) -> None:
        for host in [*self.hosts.values(), self.switch]:
            host.stop()

    def leftovers(self) -> list[str]:
        """Processes still in any namespace the network made (none once stopped)."""
        ours = {ns for h in [*self.hosts.values(), self.switch] for ns in h.namespaces.values()}
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                mine = {os.readlink(f"/proc/{proc.pid}/ns/{k}") for k in ("net", "mnt", "pid")}
            except OSError:
                continue
            if mine & ours:
                left.append(f"{proc.pid}: {shlex.join(proc.info['cmdline'] or [])}")
        return left
