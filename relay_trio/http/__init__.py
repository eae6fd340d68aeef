"""The HTTP front door: quart-trio routes, OpenAPI, status page, and the one module that
touches hypercorn's internals (:mod:`.hypercorn_patch`).
"""
