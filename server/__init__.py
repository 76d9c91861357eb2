"""camfed's Flower ServerApp (``server.app:app``)."""
