"""Flower ServerApp: run config → typed Config → ``common.federated.server.run_federation``."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from common.federated.server import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, load_config(context.run_config))
