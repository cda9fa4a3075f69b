"""Stage-two classifiers of the router, one module per kind; ``registry`` names them.

A new kind is a module with a class that meets ``coe.router.base.Classifier`` and one line in
``registry.CLASSIFIERS``; fitting, cross-validation, saving and `coe router fit --kind` find it
there. scikit-learn is imported when a classifier is fitted or loaded, not when this package is:
the CLI reads the registry's names at start.
"""
