"""The model registry: the safe model format, registering versions, loading them, promotion.

Kept free of imports: the registered model ships this package as its code, and
``ldct_pyfunc.py`` imports only :mod:`ldct.registry.model_format`.
"""
