"""Replicas of `gptcore serve` behind nginx on one machine: serving that grows with traffic by
adding processes, as the Kubernetes manifests of deploy/k8s do with pods.

    python -m gptcore.balancer up DIR --model URI [--model URI ...] [--replicas 3] [--threads 1]
    python -m gptcore.balancer down DIR

Each replica is `gptcore serve` on a free loopback port with one bearer token (made at `up`, in
DIR/balancer.json and DIR/env.sh, readable by their owner alone); nginx, the distribution's
package, listens on one more port and sends each request to the replica holding the fewest
(`least_conn`). A replica that refuses the connection is passed over for the next one at once, a
POST included (nothing of it was sent: `proxy_next_upstream error non_idempotent`), and left out for
FAIL_TIMEOUT_S; a replica that dies mid-answer fails the requests it held, and no other. Responses
are not buffered, so streamed tokens reach the client as they are made. Processes are groups with
pid files (gptcore.processes): `down` ends them all.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from gptcore.processes import free_port, start_group, stop_group, write_private

BIN = Path(sys.executable).parent  # this environment's `gptcore`
FAIL_TIMEOUT_S = 10  # how long nginx leaves out a replica that refused a connection
UPSTREAM_TRIES = 3  # replicas a request may be offered to before it fails


@dataclass(frozen=True)
class BalancerConfig:
    """What `up` chose (DIR/balancer.json)."""

    root: str
    port: int
    replica_ports: list[int]
    token: str
    models: list[str]
    threads: int = 1  # ONNX Runtime's intra-op threads per replica: replicas share the machine's cores

    @classmethod
    def new(cls, root: Path, models: list[str], replicas: int, threads: int = 1) -> BalancerConfig:
        ports = [free_port() for _ in range(replicas + 1)]
        return cls(str(root.resolve()), ports[0], ports[1:], secrets.token_urlsafe(24), models, threads)

    @classmethod
    def load(cls, root: Path) -> BalancerConfig:
        return cls(**json.loads((root / "balancer.json").read_text()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def nginx_conf(c: BalancerConfig) -> str:
    root, nginx = Path(c.root), Path(c.root) / "nginx"
    servers = "\n".join(
        f"    server 127.0.0.1:{p} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;" for p in c.replica_ports
    )
    temp = "\n".join(
        f"  {kind}_temp_path {nginx / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would drop to `nobody`, locked out of DIR
    return f"""{user}
daemon off;
worker_processes 1;
pid {nginx / "nginx.pid"};
error_log {root / "logs" / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
  log_format upstream '$remote_addr $request_method $uri $status $upstream_addr $request_time';
  access_log {root / "logs" / "nginx-access.log"} upstream;
{temp}
  upstream gptcore {{
    least_conn;
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{c.port};
    client_max_body_size 4m;
    location / {{
      proxy_pass http://gptcore;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
      proxy_read_timeout 600s;
      proxy_next_upstream error non_idempotent;
      proxy_next_upstream_tries {UPSTREAM_TRIES};
    }}
  }}
}}
"""


class Balancer:
    """The replicas and nginx under `root`: started, stopped and restarted by name."""

    def __init__(self, config: BalancerConfig):
        self.config, self.root = config, Path(config.root)
        self.pids, self.logs = self.root / "pids", self.root / "logs"

    @property
    def replica_names(self) -> list[str]:
        return [f"serve-{i}" for i in range(1, len(self.config.replica_ports) + 1)]

    def pid(self, name: str) -> int:
        return int((self.pids / f"{name}.pid").read_text())

    def up(self) -> None:
        for folder in (self.pids, self.logs, self.root / "nginx"):
            folder.mkdir(parents=True, exist_ok=True)
        write_private(self.root / "balancer.json", json.dumps(asdict(self.config), indent=2))
        try:
            for name in self.replica_names:
                self.start(name)
            self.start("nginx")
        except BaseException:
            self.down()
            raise
        write_private(
            self.root / "env.sh",
            f"export GPTCORE_SERVE_URL={shlex.quote(self.config.url)}\n"
            f"export GPTCORE_SERVE_TOKEN={shlex.quote(self.config.token)}\n",
        )

    def start(self, name: str) -> None:
        c, log, pid_file = self.config, self.logs / f"{name}.log", self.pids / f"{name}.pid"
        if name == "nginx":
            conf = self.root / "nginx" / "nginx.conf"
            conf.write_text(nginx_conf(c))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            argv = [nginx, "-p", str(self.root / "nginx"), "-c", str(conf), "-e", str(self.logs / "nginx-error.log")]
            return start_group(argv, dict(os.environ), self.root / "nginx", log, pid_file, f"{c.url}/readyz")
        port = c.replica_ports[self.replica_names.index(name)]
        argv = [str(BIN / "gptcore"), "serve", "--port", str(port), "--threads", str(c.threads)]
        argv += [arg for model in c.models for arg in ("--model", model)]
        env = dict(os.environ) | {"GPTCORE_SERVE_TOKEN": c.token, "PYTHONUNBUFFERED": "1"}
        start_group(argv, env, self.root / name, log, pid_file, f"http://127.0.0.1:{port}/readyz")

    def stop(self, name: str) -> None:
        stop_group(self.pids / f"{name}.pid")

    def down(self) -> None:
        for name in ["nginx", *self.replica_names]:
            self.stop(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptcore.balancer", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", type=Path, help="the replicas' state and logs, balancer.json and env.sh")
    parser.add_argument("--model", action="append", help="as `gptcore serve --model` (repeat for several)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    args = parser.parse_args(argv)
    if args.action == "up":
        if not args.model:
            parser.error("up needs --model")
        if args.replicas < 1:
            parser.error("--replicas: at least 1")
        if (args.dir / "balancer.json").exists():
            parser.error(f"{args.dir} holds a balancer already: `down` it, then `up` in a new directory")
        args.dir.mkdir(parents=True, exist_ok=True)
        balancer = Balancer(BalancerConfig.new(args.dir, args.model, args.replicas, args.threads))
        balancer.up()
        print(f"{args.replicas} replicas behind {balancer.config.url}: source {args.dir / 'env.sh'}")
    else:
        Balancer(BalancerConfig.load(args.dir)).down()
        print(f"replicas under {args.dir} stopped")


if __name__ == "__main__":
    main()
