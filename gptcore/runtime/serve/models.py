"""The models a server answers with (at most one of each kind: a language model, a chat model, a
classifier), the names requests call them by, and their hot reload.

A model given as `models:/NAME@ALIAS` follows its alias: `refresh` asks the registry which version
the alias names and, when that changed, loads the new version beside the old one and swaps the
reference. A request takes its model once, when it starts, so in-flight requests finish on the
version they began with (a replaced engine takes no new requests and stops once its own are
done); a failed reload keeps the version being served, and the version that failed is tried again
only after a backoff (RETRY_FIRST_S, doubling up to RETRY_MAX_S), not at every poll: each attempt
downloads the version, and a download from a remote artifact store is a directory of its own.

With engine limits, each LM and chat model decodes through its own `gptcore.runtime.engine.Engine`
(continuous batching); without, or for a package older than format 3, requests decode alone.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcore.errors import InputError
from gptcore.runtime.package import model_version

log = logging.getLogger("gptcore.serve")

RETRY_FIRST_S, RETRY_MAX_S = 60.0, 3600.0  # after a failed reload onto a version: wait, then double


@dataclass(frozen=True)
class FailedReload:
    version: str
    retry_at: float  # time.monotonic() after which it is tried again
    backoff: float


@dataclass(frozen=True)
class Served:
    model: Any  # OnnxLM, OnnxChat or OnnxClassifier
    kind: str  # "lm", "chat" or "classifier"
    uri: str  # as given on the command line
    version: str | None  # the registered version; None for a package directory or a run's artifacts
    loaded_at: int = field(default_factory=lambda: int(time.time()))  # Unix time this version was loaded
    engine: Any = None  # the Engine that batches its generations; None: each decodes alone
    download_dir: Path | None = None  # where a registry or run URI was downloaded; removed with it

    @property
    def generator(self) -> Any:
        """What generations decode through: `iter_ids` and `generate_ids` of the engine, or of the model."""
        return self.engine if self.engine is not None else self.model

    @property
    def name(self) -> str:
        """What OpenAI-style requests call it: the registered model's name (`gptcore-chat` of
        `models:/gptcore-chat@champion`), a package directory's name, or else the URI itself."""
        if self.uri.startswith("models:/"):
            return self.uri[len("models:/") :].partition("@")[0].partition("/")[0]
        if self.uri.startswith("runs:/"):
            return self.uri
        return Path(self.uri).resolve().name or self.uri

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "uri": self.uri,
            "version": self.version,
            "provider": self.model.provider,
            "variant": self.model.variant,
            "batching": "continuous" if self.engine is not None else "per-request",
        }


def follows_alias(uri: str) -> bool:
    return uri.startswith("models:/") and "@" in uri


def pinned_version(uri: str) -> str | None:
    """VERSION of `models:/NAME/VERSION`; None for anything else."""
    if not uri.startswith("models:/") or "@" in uri:
        return None
    return uri[len("models:/") :].partition("/")[2] or None


class ServedModels:
    """The served model of each kind; `load_all` once, then `refresh` to follow registry aliases."""

    def __init__(
        self,
        uris: list[str],
        load: Callable[[str], Any],
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        engine_limits: Any = None,
        observer: Any = None,
    ):
        self.uris, self.load = list(uris), load
        self.engine_limits, self.observer = engine_limits, observer
        self.tracking_uri, self.registry_uri = tracking_uri, registry_uri or tracking_uri
        self.by_kind: dict[str, Served] = {}
        self.failed: dict[str, FailedReload] = {}  # by URI: the version it last failed to move onto
        self._client = None

    def get(self, kind: str) -> Served | None:
        return self.by_kind.get(kind)

    def find(self, name: str) -> Served | None:
        """The served model `name` calls: by its name, else by its kind ("lm", "chat", "classifier"),
        else by its URI as given: the first match in that order (so a kind names its model unless
        another model is called by that word)."""
        for attribute in ("name", "kind", "uri"):
            for served in self.by_kind.values():
                if getattr(served, attribute) == name:
                    return served
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [served.describe() for served in self.by_kind.values()]

    def client(self):
        if self._client is None:  # MLflow is imported only when a registry URI is served
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def load_uri(self, uri: str, version: str | None = None) -> Served:
        """Load `uri`, or, for an alias, the given registered `version` of its model (the one it named when asked).

        A registry or run URI is downloaded into a directory of its own, removed if the load fails
        and when the version is no longer served (the sessions and tokenizer are in memory by then).
        """
        target = uri if version is None else f"models:/{uri[len('models:/') :].partition('@')[0]}/{version}"
        downloads = target.startswith(("models:/", "runs:/"))
        download_dir = Path(tempfile.mkdtemp(prefix="gptcore-serve-")) if downloads else None
        try:
            model = self.load(target, download_dir=download_dir)
        except BaseException:
            remove_download(download_dir)
            raise
        version = version if version is not None else pinned_version(uri)
        kind, engine = model.package.kind, None
        if self.engine_limits is not None and kind in ("lm", "chat"):
            if model.fixed_cache:
                from gptcore.runtime.engine import Engine

                engine = Engine(model, self.engine_limits, self.observer, kind)
            else:
                log.warning("serve: %s is a package of format < 3: its requests decode one by one (re-export it)", uri)
        return Served(model, kind, uri, version, engine=engine, download_dir=download_dir)

    def alias_version(self, uri: str) -> str:
        return str(model_version(self.client(), uri).version)

    def load_all(self) -> None:
        """Load every model; two of one kind are an error (a request to /v1/generate or /v1/classify
        could not say which it means)."""
        for uri in self.uris:
            served = self.load_uri(uri, self.alias_version(uri) if follows_alias(uri) else None)
            if served.kind in self.by_kind:
                raise InputError(
                    f"{uri}: a second {served.kind} (after {self.by_kind[served.kind].uri}); "
                    "serve at most one model of each kind (a language model, a chat model, a classifier)"
                )
            self.by_kind[served.kind] = served
            log.info("serve: %s loaded (%s, version %s, %s)", uri, served.kind, served.version, served.model.provider)

    def refresh(self) -> list[str]:
        """Follow each alias to its current version: the outcome per alias that moved ("reloaded" or "failed")."""
        outcomes = []
        for kind, served in list(self.by_kind.items()):
            if not follows_alias(served.uri):
                continue
            version = None
            try:
                version = self.alias_version(served.uri)
                failed = self.failed.get(served.uri)
                if version == served.version or (
                    failed is not None and failed.version == version and time.monotonic() < failed.retry_at
                ):
                    continue
                fresh = self.load_uri(served.uri, version)
                if fresh.kind != kind:
                    retire(fresh)
                    raise InputError(f"{served.uri}: version {version} is a {fresh.kind}, not a {kind}")
            except Exception as e:  # the registry or the new package failed: keep serving what works
                if version is not None:
                    self.back_off(served.uri, version)
                log.error("serve: reloading %s failed, still serving version %s: %s", served.uri, served.version, e)
                outcomes.append("failed")
                continue
            self.failed.pop(served.uri, None)
            self.by_kind[kind] = fresh  # one reference swap: requests already running keep the old model
            retire(served)
            log.info("serve: %s now serves version %s (was %s)", served.uri, version, served.version)
            outcomes.append("reloaded")
        return outcomes

    def back_off(self, uri: str, version: str) -> None:
        previous = self.failed.get(uri)
        again = previous is not None and previous.version == version
        backoff = min(RETRY_MAX_S, 2 * previous.backoff) if again else RETRY_FIRST_S
        self.failed[uri] = FailedReload(version, time.monotonic() + backoff, backoff)
        log.warning("serve: %s version %s is tried again in %.0f s at the earliest", uri, version, backoff)

    def close(self) -> None:
        """Stop the engines once their requests are done, and remove the downloads."""
        for served in self.by_kind.values():
            retire(served)


def retire(served: Served) -> None:
    """A version no longer served: its engine takes no new requests, its download goes."""
    if served.engine is not None:
        served.engine.close()
    remove_download(served.download_dir)


def remove_download(download_dir: Path | None) -> None:
    if download_dir is not None:
        shutil.rmtree(download_dir, ignore_errors=True)
