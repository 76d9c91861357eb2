"""Federated-by-camera training on Flower: one client per camera, server averaging of shared weights.

Modules: ``arrays`` (state dicts ↔ ArrayRecord, weighted average), ``state`` (per-camera private
state on disk), ``data`` (node dataset and camera partition), ``client`` (the ClientApp's local
round), ``strategy`` (CameraFedAvg), ``server`` (rounds, evaluation, checkpoints, resume),
``history`` (metrics files and plot), ``launch`` (start a local simulation SuperLink, ``flwr run``,
stop it).  The in-process grid for tests and experiments is ``camfed.inprocess`` (not in the app bundle).
"""
