"""camfed core: data, models, losses, methods, evaluation and post-processing."""
