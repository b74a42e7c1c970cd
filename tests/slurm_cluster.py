"""A real single-node SLURM cluster for the tests, built from Debian's packages.

``SlurmCluster(root).start()`` installs ``slurmctld slurmd slurm-client munge`` with apt when they
are missing (needs root), writes a private ``slurm.conf`` and ``gres.conf`` under ``root`` (this
host is controller and only node, with one fake ``gpu:a40`` and one fake ``gpu:titanrtx``), starts
its own ``munged`` (as user munge, on a private socket and key), ``slurmctld`` and ``slurmd`` in the
foreground as child processes, and waits until the node is idle. ``stop()`` ends exactly those
three processes. Clients find the cluster through ``SLURM_CONF`` (see ``env``), except ``srun``
inside a job: the plugin's job step removes every ``SLURM_*`` variable but a few before it calls
``srun``, which then reads the default ``/etc/slurm/slurm.conf``. So while the cluster runs that
path is a symlink to the private config; an existing file there (a real SLURM installation)
stops ``start()`` before anything is changed, and ``stop()`` removes only its own symlink.

Run it by hand to try the workflow against it::

    python tests/slurm_cluster.py start /tmp/scgpt-vcc-slurm   # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop /tmp/scgpt-vcc-slurm
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "mungekey")
SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin")
# Fake GPU types of the node: the SLURM type names of config/config.yaml's gpu_classes.
GPU_TYPES = ("a40", "titanrtx")
# The node announces more CPUs and memory than a CI machine has (SlurmdParameters=config_overrides),
# so that the shipped profile's requests, sized for real data, are accepted unchanged.
NODE_CPUS = 16
NODE_MEMORY_MB = 256_000
# Far above the plugin's squeue threshold (3 x the first status-check delay): finished jobs stay
# visible to squeue, which stands in for sacct since there is no accounting database.
MIN_JOB_AGE_S = 900


class SlurmError(RuntimeError):
    """The test cluster could not be installed or started."""


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))


def ensure_installed() -> None:
    """Install the Debian SLURM and munge packages unless all their programs are present."""
    if all(_which(p) for p in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmError(f"SLURM is not installed and installing {PACKAGES} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    missing = [p for p in PROGRAMS if not _which(p)]
    if missing:
        raise SlurmError(f"installed {PACKAGES} but {missing} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    """One controller + one node on this host, with its files under ``root``."""

    root: Path
    partition: str = "debug"
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's client commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        ensure_installed()
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise SlurmError(
                f"{SYSTEM_CONF} exists ({SYSTEM_CONF.resolve()}): this host has a SLURM "
                "configuration of its own, which the test cluster will not replace"
            )
        self._write_files()
        try:
            SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
            SYSTEM_CONF.symlink_to(self.conf)
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-D"])
            self._wait(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer", timeout_s)
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node])
            self._wait(self._node_idle, f"node {self.node} to become idle", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the daemons this object started (node first), then wait for them."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.readlink() == self.conf:
            SYSTEM_CONF.unlink()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, *cmd: str) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        done = subprocess.run(
            cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still remembers, as ``scontrol show job`` key=value fields."""
        out = self.run("scontrol", "--oneliner", "show", "job")
        jobs = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            jobs.append(fields)
        return jobs

    def _ok(self, cmd: list[str]) -> bool:
        try:
            self.run(*cmd)
        except (SlurmError, subprocess.TimeoutExpired):
            return False
        return True

    def _node_idle(self) -> bool:
        try:
            state = self.run("sinfo", "--noheader", "--nodes", self.node, "--format", "%T")
        except (SlurmError, subprocess.TimeoutExpired):
            return False
        return state.strip() == "idle"

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{dead} exited while waiting for {what}:\n{self._log_tails()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmError(
            f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self._log_tails()}"
        )

    def _log_tails(self) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*.*")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log}\n" + "\n".join(lines))
        return "\n".join(tails)

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (owned by the Popen)
        # SLURM_CONF rather than -f: slurmstepd passes it on to the job's srun steps.
        self._procs[name] = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
            **kwargs,
        )
        out.close()

    def _start_munged(self) -> None:
        """A private munged: own key and socket, so a system munge is neither needed nor touched."""
        mdir = self.root / "munge"
        key = mdir / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        cmd = [
            _which("munged"),
            "--foreground",
            f"--socket={mdir / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]
        self._spawn("munged", cmd, user="munge", group="munge")
        socket_path = mdir / "munge.socket"
        self._wait(socket_path.exists, "munged's socket", 30)

    def _write_files(self) -> None:
        for sub in ("etc", "log", "state", "spool", "run", "gpu"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        mdir.chmod(0o755)  # munged wants the socket folder searchable by all
        shutil.chown(mdir, "munge", "munge")
        devices = []
        for index, gpu_type in enumerate(GPU_TYPES):
            device = self.root / "gpu" / f"fake-nvidia{index}"
            device.touch()
            devices.append(f"NodeName={self.node} Name=gpu Type={gpu_type} File={device}")
        (self.root / "etc" / "gres.conf").write_text("\n".join(devices) + "\n")
        gres = ",".join(f"gpu:{t}:1" for t in GPU_TYPES)
        r = self.root
        self.conf.write_text(
            f"""# Written by tests/slurm_cluster.py: a throwaway single-node cluster.
ClusterName=scgpt-vcc-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / "munge" / "munge.socket"}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge={MIN_JOB_AGE_S}
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} \
Gres={gres} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path, help="folder for the cluster's config, state and logs")
    args = parser.parse_args(argv)
    cluster = SlurmCluster(args.root.resolve())
    if args.action == "start":
        cluster.start()
        # The daemons outlive this command; their pids go to files for `stop`.
        for name, proc in cluster._procs.items():
            (cluster.root / "run" / f"{name}.child.pid").write_text(str(proc.pid))
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = cluster.root / "run" / f"{name}.child.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text())
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                pid_file.unlink()
                deadline = time.monotonic() + 30
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.readlink() == cluster.conf:
            SYSTEM_CONF.unlink()


if __name__ == "__main__":
    sys.exit(main())
