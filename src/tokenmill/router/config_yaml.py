"""YAML as the gateway's config reads it: ``safe_load``, but

- every mapping key is its text as written: the config's keys are names (fields, teams, models),
  and YAML would read the team ``007:`` as the number 7, ``0x10:`` as 16, ``no:`` as false;
- a key given twice in one mapping is an error (PyYAML keeps the last one silently: a team's limit
  written twice would be whichever came last);
- a number with an exponent but no dot (``1e6``, ``1e-7``) is a number, as in YAML 1.2 and JSON
  (YAML 1.1 reads it as text, so ``prompt: 1e-7``, the natural way to write a price a token, was
  refused as not a number);
- a syntax error is one line, with its position."""

from __future__ import annotations

import re
from typing import Any


class ConfigYAMLError(ValueError):
    """The text is not YAML, or repeats a key; the message is one line."""


def load_config_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(e.problem or e.context or "not YAML").split())
        raise ConfigYAMLError(f"{problem}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigYAMLError(" ".join(str(e).split())) from None


_LOADER: Any = None
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"
_FLOAT = "tag:yaml.org,2002:float"
# What YAML 1.1's float pattern misses and YAML 1.2's takes: an exponent without a dot, or unsigned.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _loader() -> Any:
    global _LOADER
    if _LOADER is None:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
            seen: dict[Any, int] = {}  # key -> the line it is first given on
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # `<<: *defaults`: its keys may be overridden
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key_node.tag = _STR  # the name as written
                key = loader.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: construct_mapping says so
                    break
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} is given twice (first at line {seen[key]})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
            return loader.construct_mapping(node, deep=True)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        # (Tried after YAML 1.1's own resolvers, so it changes only what they read as text.)
        Loader.add_implicit_resolver(_FLOAT, _EXPONENT_FLOAT, list("-+0123456789."))
        _LOADER = Loader
    return _LOADER
