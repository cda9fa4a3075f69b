"""coe on a Ray cluster: the gateway and the expert engines as Ray Serve deployments, with a
request router that sends each request to a replica already holding its expert's weights.

``policy.py`` is the routing rule itself (pure, shared with the `coe bench cluster` simulation);
the modules that import Ray load it lazily, so `import coe.cluster` needs no Ray.
"""
