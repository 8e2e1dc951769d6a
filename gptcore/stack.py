"""The production stack of deploy/compose.yaml as plain processes on one machine, without Docker:
PostgreSQL (two databases: `mlflow`, which also holds MLflow's users, and `prefect`), an S3 server
with the artifact bucket, `mlflow server` (PostgreSQL backend store, S3 artifact root, basic-auth),
`prefect server start` on PostgreSQL with an API auth string, and process workers on the pool.

    python -m gptcore.stack up DIR [--workers N]   # state, logs and DIR/env.sh under DIR
    source DIR/env.sh                              # a client's exports
    python -m gptcore.stack down DIR               # stops what up started, by process id

Everything listens on free loopback ports. Secrets are made at `up`, written only to DIR/env.sh
and DIR/stack.json (both readable by their owner alone), and reach the servers through their
environment, never their argv. Each process but PostgreSQL (whose own pg_ctl stops it) runs in a
process group of its own, its pid in DIR/pids: `down` ends the group, so flow runs a worker spawned
go with it. The S3 server is moto's standalone server, as in MLflow's own tests: for tests and
trying the stack, not for data a team keeps (compose runs MinIO there).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gptcore.processes import START_TIMEOUT_S, free_port, start_group, stop_group, write_private

BIN = Path(sys.executable).parent  # mlflow, prefect and moto_server of this environment
PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin")]  # Debian's; otherwise initdb et al. on PATH
PG_SYSTEM_USER = "postgres"  # who runs PostgreSQL when the stack is started as root
BUCKET, POOL, DB_USER, MLFLOW_ADMIN = "gptcore", "gptcore-process", "gptcore", "admin"
# Flow runs send a heartbeat this often (Prefect's minimum): deploy/automations.yaml marks one
# that falls silent Crashed.
HEARTBEAT_S = 30
AUTOMATIONS = Path(__file__).resolve().parents[1] / "deploy" / "automations.yaml"
CRASH_AUTOMATION = "gptcore-crash-silent-flow-runs"  # its first automation's name
WORKER_LIMIT = 1  # flow runs a worker takes at once: a machine trains one model at a time
SERVICES = ("s3", "mlflow", "prefect")  # started in this order after PostgreSQL; workers follow


def pg_tool(name: str) -> str:
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return name


@dataclass(frozen=True)
class StackConfig:
    """What `up` chose: ports and secrets (DIR/stack.json), from which every command and env follows."""

    root: str
    pg_port: int
    s3_port: int
    mlflow_port: int
    prefect_port: int
    db_password: str
    mlflow_password: str  # the MLflow admin's; MLflow wants >= 12 characters
    prefect_auth_string: str
    s3_key: str
    s3_secret: str
    pg_data: str  # PostgreSQL's data directory (see pg_data_dir)
    workers: int = 2
    schedules: bool = True  # the Prefect scheduler: off in tests, so no scheduled run starts behind them

    @classmethod
    def new(cls, root: Path, workers: int = 2, schedules: bool = True) -> StackConfig:
        token = secrets.token_urlsafe
        return cls(
            root=str(root.resolve()),
            pg_port=free_port(),
            s3_port=free_port(),
            mlflow_port=free_port(),
            prefect_port=free_port(),
            db_password=token(16),
            mlflow_password=token(16),
            prefect_auth_string=f"gptcore:{token(16)}",
            s3_key="gptcore-stack",
            s3_secret=token(16),
            pg_data=str(pg_data_dir(root)),
            workers=workers,
            schedules=schedules,
        )

    @classmethod
    def load(cls, root: Path) -> StackConfig:
        return cls(**json.loads((root / "stack.json").read_text()))

    def db_uri(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.db_password}@127.0.0.1:{self.pg_port}/{db}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client_env(self) -> dict[str, str]:
        """What a client of the stack needs (DIR/env.sh)."""
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}",
            "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "GPTCORE_STACK_MLFLOW_DB_URI": self.db_uri("mlflow"),
        }


def base_env(**extra: str | Path) -> dict[str, str]:
    """This process's environment without its PREFECT_*/MLFLOW_*/AWS_* (a stray PREFECT_API_KEY
    would stand in for the auth string), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return env | {"PYTHONUNBUFFERED": "1"} | {k: str(v) for k, v in extra.items()}


class Stack:
    """The processes of one stack under `root`: start, stop and restart each by name."""

    def __init__(self, config: StackConfig):
        self.config, self.root = config, Path(config.root)
        self.pids, self.logs = self.root / "pids", self.root / "logs"

    # --- what each service is -------------------------------------------------------------------
    def command(self, name: str) -> tuple[list[str], dict[str, str], str | None]:
        """(argv, environment, readiness URL) of a service or worker."""
        c, root = self.config, self.root
        if name == "s3":
            return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(c.s3_port)], base_env(), c.s3_endpoint
        if name == "mlflow":
            auth = root / "mlflow" / "basic_auth.ini"
            env = base_env(
                MLFLOW_BACKEND_STORE_URI=c.db_uri("mlflow"),
                MLFLOW_AUTH_CONFIG_PATH=auth,
                MLFLOW_FLASK_SERVER_SECRET_KEY=c.db_password,
                MLFLOW_S3_ENDPOINT_URL=c.s3_endpoint,
                AWS_ACCESS_KEY_ID=c.s3_key,
                AWS_SECRET_ACCESS_KEY=c.s3_secret,
                AWS_DEFAULT_REGION="us-east-1",
            )
            # Clients write artifacts to the bucket themselves (MLFLOW_S3_ENDPOINT_URL and the keys in
            # env.sh): the URIs MLflow records point at the bucket, not at the tracking server.
            argv = [
                str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                "--port", str(c.mlflow_port), "--default-artifact-root", f"s3://{BUCKET}/mlflow",
                "--no-serve-artifacts", "--workers", "2",
            ]  # fmt: skip
            return argv, env, f"http://127.0.0.1:{c.mlflow_port}/health"
        if name == "prefect":
            env = base_env(
                PREFECT_HOME=root / "prefect",
                PREFECT_API_DATABASE_CONNECTION_URL=c.db_uri("prefect", "postgresql+asyncpg"),
                PREFECT_SERVER_API_AUTH_STRING=c.prefect_auth_string,
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED=str(c.schedules).lower(),
            )
            argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(c.prefect_port)]
            return argv, env, f"http://127.0.0.1:{c.prefect_port}/api/health"
        if name.startswith("worker-"):
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", name]
            argv += ["--limit", str(WORKER_LIMIT)]
            return argv, self.worker_env(name), None
        raise ValueError(f"no service {name!r} in the stack")

    def worker_env(self, name: str) -> dict[str, str]:
        env = self.config.client_env()
        env.pop("GPTCORE_STACK_MLFLOW_DB_URI")  # the workers talk to the servers, not the database
        return base_env(
            PREFECT_HOME=self.root / name / "prefect",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
            **env,
        )

    @property
    def worker_names(self) -> list[str]:
        return [f"worker-{i}" for i in range(1, self.config.workers + 1)]

    # --- starting and stopping ------------------------------------------------------------------
    def up(self) -> None:
        """Everything, in order, each waited for; on a failure what started is stopped again."""
        for folder in (self.pids, self.logs, self.root / "mlflow", self.root / "prefect"):
            folder.mkdir(parents=True, exist_ok=True)
        write_private(self.root / "stack.json", json.dumps(asdict(self.config), indent=2))
        try:
            self.postgres_up()
            self.write_auth_config()
            for name in SERVICES:
                self.start(name)
            self.make_bucket()
            self.create_pool()
            self.create_automations()
            for name in self.worker_names:
                self.start(name)
        except BaseException:
            self.down()
            raise
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.config.client_env().items())
        write_private(self.root / "env.sh", exports)

    def start(self, name: str) -> None:
        if name == "postgres":
            return self.postgres_up()
        argv, env, ready_url = self.command(name)
        start_group(argv, env, self.root / name, self.logs / f"{name}.log", self.pids / f"{name}.pid", ready_url)

    def stop(self, name: str) -> None:
        """The service's process group ended (processes.stop_group); PostgreSQL by its pg_ctl."""
        if name == "postgres":
            return self.postgres_down()
        stop_group(self.pids / f"{name}.pid")

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def down(self) -> None:
        """Everything stopped; a PostgreSQL data directory outside DIR (see pg_data_dir) removed."""
        for name in [*reversed(self.worker_names), *reversed(SERVICES)]:
            self.stop(name)
        self.postgres_down()
        if not self.pg_data.is_relative_to(self.root):
            shutil.rmtree(self.pg_data, ignore_errors=True)

    # --- PostgreSQL, the bucket, the pool -------------------------------------------------------
    @property
    def pg_data(self) -> Path:
        return Path(self.config.pg_data)

    def postgres_up(self) -> None:
        c, data = self.config, self.pg_data
        fresh = not (data / "db" / "PG_VERSION").is_file()  # initdb's own marker
        if fresh:
            data.mkdir(mode=0o700, exist_ok=True)
            password_file = data / "password"
            write_private(password_file, c.db_password)
            owned_by_pg_user(data, password_file)
            try:
                auth = ["--auth-host", "scram-sha-256", "--auth-local", "scram-sha-256"]
                initdb = [pg_tool("initdb"), "-D", str(data / "db"), "-U", DB_USER, "-E", "UTF8"]
                run(as_pg_user([*initdb, "--pwfile", str(password_file), *auth]))
            finally:
                password_file.unlink()
        options = f"-p {c.pg_port} -c listen_addresses=127.0.0.1 -k {data}"
        run(as_pg_user([pg_tool("pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "postgres.log"),
             "-w", "-t", str(START_TIMEOUT_S), "start"]))  # fmt: skip
        if fresh:
            for db in ("mlflow", "prefect"):
                run([pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(c.pg_port), "-U", DB_USER, db],
                    env=base_env(PGPASSWORD=c.db_password))  # fmt: skip

    def postgres_down(self) -> None:
        if (self.pg_data / "db" / "postmaster.pid").is_file():
            run(as_pg_user([pg_tool("pg_ctl"), "-D", str(self.pg_data / "db"), "-m", "fast", "-w", "stop"]))

    def write_auth_config(self) -> None:
        """MLflow's basic-auth users in the mlflow database too (their own migration table)."""
        c = self.config
        write_private(
            self.root / "mlflow" / "basic_auth.ini",
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {c.db_uri('mlflow')}\n"
            f"admin_username = {MLFLOW_ADMIN}\nadmin_password = {c.mlflow_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n",
        )

    def s3_client(self):
        import boto3

        c = self.config
        return boto3.client(
            "s3", endpoint_url=c.s3_endpoint, aws_access_key_id=c.s3_key, aws_secret_access_key=c.s3_secret,
            region_name="us-east-1",
        )  # fmt: skip

    def make_bucket(self) -> None:
        self.s3_client().create_bucket(Bucket=BUCKET)

    def create_pool(self) -> None:
        env = self.worker_env("worker-1")
        run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=env)

    def create_automations(self) -> None:
        """deploy/automations.yaml on the server (a stack brought up again keeps its own)."""
        env, prefect = self.worker_env("worker-1"), str(BIN / "prefect")
        inspect = [prefect, "automation", "inspect", CRASH_AUTOMATION]
        if subprocess.run(inspect, env=env, capture_output=True, timeout=START_TIMEOUT_S).returncode:  # not there
            run([prefect, "automation", "create", "--from-file", str(AUTOMATIONS)], env=env)


def pg_data_dir(root: Path) -> Path:
    """DIR/postgres; as root, a fresh directory under the system's temporary folder instead, owned by
    the `postgres` user: PostgreSQL refuses to run as root, and DIR may be closed to other users."""
    if os.geteuid() != 0:
        return root.resolve() / "postgres"
    return Path(tempfile.mkdtemp(prefix="gptcore-stack-pg-"))


def as_pg_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", PG_SYSTEM_USER, "--", *argv] if os.geteuid() == 0 else argv


def owned_by_pg_user(*paths: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam(PG_SYSTEM_USER)
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, env=env or base_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"stack: {' '.join(argv[:3])} … exited with {done.returncode}:\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptcore.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", type=Path, help="the stack's state, logs and env.sh")
    parser.add_argument("--workers", type=int, default=2, help="process workers on the gptcore-process pool")
    parser.add_argument("--no-schedules", action="store_true", help="no scheduled flow run starts by itself")
    args = parser.parse_args(argv)
    if args.action == "up":
        if (args.dir / "stack.json").exists():
            parser.error(f"{args.dir} holds a stack already: `down` it, then `up` in a new directory")
        args.dir.mkdir(parents=True, exist_ok=True)
        stack = Stack(StackConfig.new(args.dir, args.workers, not args.no_schedules))
        stack.up()
        print(f"stack up under {args.dir}: source {args.dir / 'env.sh'}")
    else:
        Stack(StackConfig.load(args.dir)).down()
        print(f"stack under {args.dir} stopped")


if __name__ == "__main__":
    main()
