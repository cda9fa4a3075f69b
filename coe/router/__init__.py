"""Routing: which expert answers a request.

``embed`` (text -> vector), ``classifier`` (vector -> category probabilities, with one of the
kinds in ``classifiers``), ``router`` (conversation -> RouteDecision), ``train`` / ``evaluate``
(fit and measure), ``mapping`` (category -> expert from measured scores), ``artifact`` (the
fitted router on disk).
"""
