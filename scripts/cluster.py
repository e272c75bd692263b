"""A throwaway 3-node RabbitMQ cluster beside the system broker (issue 15 §3).

    scripts/cluster start            three nodes, clustered, on 127.0.0.1:5681, 5682, 5683 (guest/guest)
    scripts/cluster status           which node runs, its pid and port; the quorum queues and their leaders
    scripts/cluster kill-node N      SIGKILL node N (1-3): a node that dies, not one that is stopped
    scripts/cluster start-node N     start node N again; it rejoins the cluster with its data
    scripts/cluster stop             stop every node and remove the cluster's directory

It never touches the system broker: its nodes have names of their own (carrot-cluster-N@localhost), ports
of their own (AMQP 5681-5683, Erlang distribution 25681-25683), data, logs and configuration in a
directory of their own (``$TMPDIR/carrot-cluster``; ``--dir`` or CARROT_CLUSTER_DIR choose another) and
their own Erlang cookie. The system broker's configuration and environment file are not read
(RABBITMQ_CONF_ENV_FILE points at an empty file of ours), and on Debian the scripts in the package's
lib/rabbitmq/bin are called rather than the sbin wrappers, which switch to the rabbitmq user (whose home
holds the system broker's cookie). The nodes run as the calling user. Each takes about 140 MB and starts
in 5-7 s.

Only the standard library: scripts/chaos and the tests import `Cluster` from here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES = 3
FIRST_PORT = 5681
NAME = 'carrot-cluster'
DIST_OFFSET = 20000  # RabbitMQ's own convention: distribution port = AMQP port + 20000


class ClusterError(Exception):
    """The cluster could not be started, stopped or read (the text says what and why)."""


def rabbitmq_bin() -> Path:
    """Where rabbitmq-server and rabbitmqctl are, without a wrapper that switches users."""
    given = os.environ.get('CARROT_RABBITMQ_BIN')
    if given:
        return Path(given)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(['dpkg', '-L', 'rabbitmq-server'], capture_output=True, text=True,
                                timeout=30).stdout.splitlines()
        for line in listed:
            if line.endswith('/lib/rabbitmq/bin/rabbitmq-server'):
                return Path(line).parent
    found = shutil.which('rabbitmq-server')
    if not found:
        raise ClusterError('rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server), '
                           'or set CARROT_RABBITMQ_BIN to the directory of its scripts')
    return Path(found).parent


def default_dir() -> Path:
    return Path(os.environ.get('CARROT_CLUSTER_DIR') or Path(tempfile.gettempdir()) / NAME)


class Node:
    def __init__(self, cluster: Cluster, number: int):
        self.cluster = cluster
        self.number = number
        self.name = f'{cluster.name}-{number}@localhost'
        self.port = cluster.first_port + number - 1
        self.dist_port = self.port + DIST_OFFSET
        self.base = cluster.base / f'node{number}'

    @property
    def url(self) -> str:
        return f'amqp://guest:guest@127.0.0.1:{self.port}/'

    @property
    def pid_file(self) -> Path:
        return self.base / 'pid'

    def env(self) -> dict:
        base = self.base
        return dict(self.cluster.env(),
                    RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
                    RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(self.dist_port),
                    RABBITMQ_MNESIA_BASE=str(base / 'mnesia'), RABBITMQ_LOG_BASE=str(base / 'log'),
                    RABBITMQ_PID_FILE=str(self.pid_file),
                    RABBITMQ_CONFIG_FILE=str(base / 'rabbitmq.conf'),
                    RABBITMQ_ADVANCED_CONFIG_FILE=str(base / 'advanced.config'),
                    RABBITMQ_PLUGINS_EXPAND_DIR=str(base / 'plugins-expand'),
                    RABBITMQ_ENABLED_PLUGINS_FILE=str(self.cluster.base / 'enabled_plugins'))

    def prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / 'rabbitmq.conf').write_text(
            f'listeners.tcp.local = 127.0.0.1:{self.port}\n'
            # Quick to notice a killed peer (the default is 60 s): the scenarios measure failover.
            'net_ticktime = 10\n')

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def listening(self) -> bool:
        try:
            socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def ctl(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        return self.cluster.run([self.cluster.bin / 'rabbitmqctl', '-q', '-n', self.name, *args],
                                check=check, timeout=timeout)

    def running(self) -> bool:
        return self.pid() is not None and self.ctl('ping', check=False, timeout=30).returncode == 0

    def launch(self) -> None:
        """Start the node detached (returns before it is up: see await_startup)."""
        if self.pid() is not None:
            raise ClusterError(f'node {self.name} already runs (pid {self.pid()})')
        self.prepare()
        self.pid_file.unlink(missing_ok=True)
        self.cluster.run([self.cluster.bin / 'rabbitmq-server', '-detached'], env=self.env(), timeout=60)

    def await_startup(self, timeout=90) -> None:
        deadline = time.monotonic() + timeout
        while self.ctl('await_startup', '--timeout', '30', check=False, timeout=40).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(f'node {self.name} did not start within {timeout}s; its log is in '
                                   f'{self.base / "log"}')
            time.sleep(0.5)

    def kill(self) -> int | None:
        """SIGKILL the node (its own pid, from its own pid file): it dies as a crashed host's would."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
        return pid

    def stop(self) -> None:
        if self.pid() is None:
            return
        if self.ctl('stop', check=False, timeout=60).returncode != 0:
            self.kill()


class Cluster:
    """A 3-node cluster under `base`; the same `base` (and name, ports) finds it again from another process."""

    def __init__(self, base: Path | None = None, name: str = NAME, first_port: int = FIRST_PORT,
                 nodes: int = NODES):
        self.base = Path(base or default_dir())
        self.name = name
        self.first_port = first_port
        self.bin = rabbitmq_bin()
        self.nodes = [Node(self, number) for number in range(1, nodes + 1)]

    # -- the environment every node and CLI call gets --------------------------------------------------

    def env(self) -> dict:
        home = self.base / 'home'
        env = {k: v for k, v in os.environ.items() if not k.startswith(('RABBITMQ_', 'ERL_'))}
        env.update(HOME=str(home),  # .erlang.cookie is read from $HOME, by the nodes and by rabbitmqctl
                   RABBITMQ_CONF_ENV_FILE=str(self.base / 'rabbitmq-env.conf'),  # ours, empty
                   LC_ALL='C.UTF-8', LANG='C.UTF-8')
        return env

    def run(self, cmd, check=True, timeout=60, env=None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                                env=env or self.env(), cwd=self.base if self.base.exists() else None)
        if check and result.returncode != 0:
            raise ClusterError(f'{" ".join(map(str, cmd[-3:]))} exited {result.returncode}: '
                               f'{(result.stderr + result.stdout).strip()[-2000:]}')
        return result

    def prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        home = self.base / 'home'
        home.mkdir(exist_ok=True, mode=0o700)
        cookie = home / '.erlang.cookie'
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        (self.base / 'rabbitmq-env.conf').write_text('# empty on purpose: the system broker\'s is not read\n')
        (self.base / 'enabled_plugins').write_text('[].\n')
        (self.base / 'cluster.json').write_text(json.dumps(
            {'name': self.name, 'first_port': self.first_port, 'nodes': len(self.nodes)}))

    @classmethod
    def found_at(cls, base: Path) -> Cluster:
        """The cluster a `start` left at `base` (its name and ports from cluster.json)."""
        try:
            saved = json.loads((Path(base) / 'cluster.json').read_text())
        except (OSError, ValueError):
            return cls(base)
        return cls(base, name=saved['name'], first_port=saved['first_port'], nodes=saved['nodes'])

    def node(self, number: int) -> Node:
        if not 1 <= number <= len(self.nodes):
            raise ClusterError(f'there is no node {number}: the nodes are 1 to {len(self.nodes)}')
        return self.nodes[number - 1]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    # -- commands ----------------------------------------------------------------------------------

    def start(self) -> float:
        """Start every node and join them into one cluster; the seconds it took."""
        started = time.monotonic()
        for node in self.nodes:
            if node.pid() is not None:
                raise ClusterError(f'node {node.name} already runs (pid {node.pid()}): '
                                   f'scripts/cluster stop first (dir {self.base})')
            if node.listening():
                raise ClusterError(f'port {node.port} is taken by another process')
        self.prepare()
        try:
            for node in self.nodes:  # they boot side by side; joining waits for each
                node.launch()
            for node in self.nodes:
                node.await_startup()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl('stop_app')
                node.ctl('join_cluster', first.name)
                node.ctl('start_app')
                node.await_startup()
        except BaseException:
            self.stop(remove=False)
            raise
        return time.monotonic() - started

    def stop(self, remove: bool = True) -> None:
        for node in self.nodes:
            with contextlib.suppress(ClusterError, subprocess.SubprocessError, OSError):
                node.stop()
        for node in self.nodes:
            node.kill()
        if remove and (self.base / 'cluster.json').exists():
            shutil.rmtree(self.base, ignore_errors=True)

    def kill_node(self, number: int) -> int | None:
        return self.node(number).kill()

    def start_node(self, number: int) -> float:
        node = self.node(number)
        started = time.monotonic()
        node.launch()
        node.await_startup()
        return time.monotonic() - started

    def running_node(self) -> Node | None:
        for node in self.nodes:
            if node.pid() is not None and node.listening():
                return node
        return None

    def quorum_queues(self, vhost: str = '/') -> list[dict]:
        """[{name, leader, members, online}] of the quorum queues of `vhost`, asked of a running node."""
        node = self.running_node()
        if node is None:
            return []
        result = node.ctl('list_queues', '-p', vhost, '--formatter', 'json', 'name', 'type', 'leader',
                          'members', 'online', check=False, timeout=30)
        try:
            rows = json.loads(result.stdout or '[]')
        except ValueError:
            return []
        return [row for row in rows if row.get('type') == 'quorum']

    def leader_of(self, queue: str, vhost: str = '/') -> int | None:
        """The number of the node that leads quorum queue `queue` now (None if unknown)."""
        for row in self.quorum_queues(vhost):
            if row.get('name') == queue:
                for node in self.nodes:
                    if node.name == row.get('leader'):
                        return node.number
        return None

    def status(self) -> str:
        lines = [f'cluster {self.name} in {self.base}']
        for node in self.nodes:
            pid = node.pid()
            state = 'running' if pid and node.listening() else 'starting' if pid else 'down'
            lines.append(f'  node {node.number}: {node.name:28} {state:8} pid {pid or "-":>7}  '
                         f'amqp 127.0.0.1:{node.port}  dist {node.dist_port}')
        for row in self.quorum_queues():
            lines.append(f"  quorum queue {row['name']!r}: leader {row.get('leader')}, "
                         f"online {', '.join(row.get('online') or []) or '-'}")
        return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='scripts/cluster', description=__doc__.split('\n\n')[0])
    parser.add_argument('--dir', type=Path, default=None,
                        help='where the nodes keep everything (default: $TMPDIR/carrot-cluster or '
                             'CARROT_CLUSTER_DIR)')
    parser.add_argument('--port', type=int, default=FIRST_PORT, help='AMQP port of node 1 (start)')
    parser.add_argument('--name', default=NAME, help='node name prefix (start)')
    parser.add_argument('command', choices=['start', 'stop', 'status', 'kill-node', 'start-node', 'urls'])
    parser.add_argument('node', nargs='?', type=int)
    args = parser.parse_args(argv)
    base = args.dir or default_dir()
    try:
        if args.command == 'start':
            cluster = Cluster(base, name=args.name, first_port=args.port)
            seconds = cluster.start()
            print(f'started {len(cluster.nodes)} nodes in {seconds:.1f}s')
            print(cluster.status())
            print("CARROT['default_broker'] = " + json.dumps(cluster.urls))
            return 0
        cluster = Cluster.found_at(base)
        if args.command in ('kill-node', 'start-node'):
            if args.node is None:
                parser.error(f'{args.command} needs a node number')
            if args.command == 'kill-node':
                pid = cluster.kill_node(args.node)
                print(f'node {args.node} killed (pid {pid})' if pid else f'node {args.node} was not running')
            else:
                print(f'node {args.node} started in {cluster.start_node(args.node):.1f}s')
        elif args.command == 'stop':
            cluster.stop()
            print(f'cluster stopped and {base} removed')
        elif args.command == 'urls':
            print('\n'.join(cluster.urls))
        else:
            print(cluster.status())
    except ClusterError as exc:
        print(f'scripts/cluster: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
