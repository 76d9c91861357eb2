"""camfed tooling that runs beside the Flower app and is not shipped in its bundle (outside ``fab-include``)."""
