"""camfed's Flower ClientApp (``client.app:app``): one camera per SuperNode."""
