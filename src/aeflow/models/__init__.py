"""Anomaly detection models: one file per method, all behind `AnomalyModel` and the registry."""

from aeflow.models.base import AnomalyModel, available_models, create_model, register

# Importing a model's module registers it: one line per model, so that adding a model touches one line.
from aeflow.models import ae  # noqa: E402,F401
from aeflow.models import aeflow  # noqa: E402,F401
from aeflow.models import aeflow_gmm  # noqa: E402,F401
from aeflow.models import cevae  # noqa: E402,F401
from aeflow.models import cfa  # noqa: E402,F401
from aeflow.models import cflow  # noqa: E402,F401
from aeflow.models import csflow  # noqa: E402,F401
from aeflow.models import ddad  # noqa: E402,F401
from aeflow.models import differnet  # noqa: E402,F401
from aeflow.models import draem  # noqa: E402,F401
from aeflow.models import edgerec  # noqa: E402,F401
from aeflow.models import fapm  # noqa: E402,F401
from aeflow.models import fastflow  # noqa: E402,F401
from aeflow.models import filter_bank  # noqa: E402,F401
from aeflow.models import ganomaly  # noqa: E402,F401
from aeflow.models import glow  # noqa: E402,F401
from aeflow.models import knn  # noqa: E402,F401
from aeflow.models import memseg  # noqa: E402,F401
from aeflow.models import mnad  # noqa: E402,F401
from aeflow.models import mspba  # noqa: E402,F401
from aeflow.models import padim  # noqa: E402,F401
from aeflow.models import patchcore  # noqa: E402,F401
from aeflow.models import probe  # noqa: E402,F401
from aeflow.models import pni  # noqa: E402,F401
from aeflow.models import saa  # noqa: E402,F401
from aeflow.models import statistical  # noqa: E402,F401
from aeflow.models import texture  # noqa: E402,F401
from aeflow.models import uniad  # noqa: E402,F401
from aeflow.models import vae  # noqa: E402,F401
from aeflow.models import winclip  # noqa: E402,F401

__all__ = ["AnomalyModel", "available_models", "create_model", "register"]
