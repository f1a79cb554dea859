"""Scale-out: Parley replicas on Ray Serve (`parley.deploy.ray:app`, the `ray` extra).

`asgi` and `routing` are plain Python (no Ray): one HTTP request carried to a replica and run
through Parley's own app, and the prefix table the router keeps. `router` and `ray` need Ray.
"""
