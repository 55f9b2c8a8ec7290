"""Errors a caller can act on: each message names the problem and, where it helps, the fix."""


class EdgepagedError(Exception):
    """Base of every error edgepaged raises on purpose."""


class RequestError(EdgepagedError, ValueError):
    """A request that cannot be served; it is refused before it takes any resources."""


class ModelLoadError(EdgepagedError, ValueError):
    """A model path or checkpoint edgepaged cannot load."""
