"""Flower ClientApp: a ``train`` message runs this node's camera through ``common.federated.client.train``;
a ``query`` message asks for the node's partition-id (used to sample cameras)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from common.federated import client

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return client.train(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return client.query(message, context)
