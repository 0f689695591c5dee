"""MLflow "models from code" script of the registered ldct-denoiser (see ldct/registry/model_format.py).

MLflow executes this file when it serves or pyfunc-loads the model; the `ldct` package shipped
in the model's code/ directory provides the class. ldct's own loaders never run it.
"""

import mlflow.models

from ldct.registry.model_format import pyfunc_model

mlflow.models.set_model(pyfunc_model())
