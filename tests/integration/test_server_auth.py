"""Access control on real servers: a Prefect server started with an API auth string and an MLflow
server with basic auth refuse requests without (or with wrong) credentials, 401, and serve the
clients that carry them. The authenticated pipeline run on both servers is in test_deployments.py."""

from __future__ import annotations

import httpx
import pytest


def test_mlflow_refuses_anonymous_requests_and_serves_the_credentials(servers, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow = servers.mlflow
    search = f"{mlflow.uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search, timeout=30).status_code == 401
    assert httpx.get(search, auth=(mlflow.username, "not-the-password"), timeout=30).status_code == 401
    assert httpx.get(search, auth=(mlflow.username, mlflow.password), timeout=30).status_code == 200

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MlflowException, match="401|not authenticated"):
        MlflowClient(tracking_uri=mlflow.uri).search_experiments()
    # MLflow's client reads the credentials from the environment, as gptcore's stages do
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow.password)
    client = MlflowClient(tracking_uri=mlflow.uri)
    experiment_id = client.create_experiment("auth-check")
    assert client.get_experiment(experiment_id).name == "auth-check"


def test_prefect_refuses_anonymous_requests_and_serves_the_auth_string(servers):
    from prefect.client.orchestration import get_client

    prefect = servers.prefect
    flows = f"{prefect.api_url}/flows/filter"
    assert httpx.post(flows, json={}, timeout=30).status_code == 401
    assert httpx.post(flows, json={}, auth=("gptcore", "wrong"), timeout=30).status_code == 401

    with prefect.settings(None), get_client(sync_client=True) as client:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.read_flows()
        assert refused.value.response.status_code == 401
    with prefect.settings(prefect.auth_string), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("auth-check")
        assert client.read_flow(flow_id).name == "auth-check"
