"""Prefect flows of gptcore: thin orchestration over the stage functions in `gptcore`."""

import os

# The temporary Prefect server a flow run starts when no server is configured (it inherits this
# environment) would post anonymous usage figures to prefect.io on start, and log an ERROR line in
# every run on a machine without network. A server of one's own keeps its own setting.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
