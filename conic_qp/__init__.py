"""conic-qp: classified nucleus segmentation for H&E whole-slide images (CoNIC 2022 method)."""

from conic_qp.classes import CONIC, CONSEP, ClassScheme, NucleusClass
from conic_qp.errors import ConicQPError

__version__ = "0.1.0"

__all__ = ["CONIC", "CONSEP", "ClassScheme", "ConicQPError", "NucleusClass", "__version__"]
