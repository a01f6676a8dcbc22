"""The one error of the manifest renderer: bad input for rendering, said with its fix."""

from __future__ import annotations


class K8sError(ValueError):
    """Bad input for rendering manifests: the message says what is wrong and how to fix it."""
