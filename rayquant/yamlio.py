"""The one YAML reader of every file rayquant reads (the `rayquant train` config, the `rayquant k8s`
config, inventory files): PyYAML's safe loader with YAML 1.2's numbers.

PyYAML implements YAML 1.1, whose float needs a dot: `learning_rate: 2e-4` is the *string* '2e-4'
there, and a config that looks right is refused (or, worse, carried as text). YAML 1.2 (the
version every current YAML spec and most other tools follow) reads `2e-4`, `1E5`, `+1e-5` as the
numbers they look like. This loader adds exactly that; everything else is PyYAML's safe loading.
"""

from __future__ import annotations

import re
from typing import IO, Any

# YAML 1.2 core schema floats with an exponent, which YAML 1.1 reads as floats only with a dot and a
# signed exponent ("2.0e-4"): "2e-4", "1E5", "1.5e3", ".5e-3". The other forms keep PyYAML's resolver.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$")


def _loader():
    import yaml

    class Yaml12NumbersLoader(yaml.SafeLoader):
        """SafeLoader that also reads YAML 1.2's exponent floats (`2e-4`) as floats."""

    Yaml12NumbersLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                              list("-+.0123456789"))
    return Yaml12NumbersLoader


def safe_load(stream: str | IO[str]) -> Any:
    """yaml.safe_load, reading `2e-4` as the number 0.0002 (YAML 1.2) rather than a string.
    Raises yaml.YAMLError for malformed YAML, as yaml.safe_load does."""
    import yaml

    return yaml.load(stream, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
