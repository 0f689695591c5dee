"""``ldct eval`` and every test table: slices, classical baselines, denoisers, tables.

Plain NumPy/PyTorch on the data cache: never MLflow or Ray. A registered model reaches a table
as a :data:`~ldct.evaluation.denoisers.Denoiser` built by ``ldct.registry.load``.
"""
