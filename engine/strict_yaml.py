"""YAML as configs are read: plain data only, every problem one short line naming its line.

    data = read_yaml("configs/tiny.yaml", ConfigError)     # a file
    value = parse_yaml("[0.9, 0.95]", "override optim.betas", ConfigError)   # a `key=value` override

Refused, where `yaml.safe_load` accepts them:
- a key given twice in one mapping: safe_load keeps the last, so a second `train:` block silently drops
  the first one's keys;
- anchors and aliases (`&name`, `*name`): nothing a config needs, and a 400-byte "billion laughs" of
  nested aliases expands to gigabytes (and its error message with it);
- merge keys (`<<`), which need aliases and override keys without a word.
Nesting too deep for Python's recursion is refused too. This module imports nothing of the engine.
"""

from __future__ import annotations

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYAMLError(yaml.YAMLError):
    """A YAML construct configs refuse; the message is `line N: what`."""


def _line(mark) -> str:
    return f"line {mark.line + 1}" if mark is not None else "line ?"


def _clip(text: str, limit: int = 120) -> str:
    """`text` on one line, at most `limit` characters (and "...")."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without duplicate keys, anchors, aliases and merge keys (StrictYAMLError)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:  # an alias (*name) or a node that defines one (&name): refused before expanding
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise StrictYAMLError(f"{_line(event.start_mark)}: YAML {kind}{_clip(anchor, 40)} refused "
                                  "(anchors and aliases are not supported in configs: write the value out)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    raise StrictYAMLError(f"{_line(key_node.start_mark)}: YAML merge key << refused (not supported "
                                          "in configs: write the keys out)")
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if seen is not key_node.start_mark:
                    raise StrictYAMLError(f"{_line(key_node.start_mark)}: duplicate key {_clip(repr(key), 60)} (first on "
                                          f"{_line(seen)}; YAML would keep only the last)")
        return super().construct_mapping(node, deep=deep)


def _describe(exc: BaseException) -> str:
    """One line for any YAML problem."""
    if isinstance(exc, StrictYAMLError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        return f"invalid YAML at {_line(mark)}: {_clip(exc.problem or exc.context or 'unreadable')}"
    return f"invalid YAML: {_clip(exc)}"


def parse_yaml(text: str, where: str, error: type[Exception] = ValueError):
    """The data of the YAML document `text`; any problem raises `error("WHERE: line N: what")` (one line)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except (yaml.YAMLError, RecursionError) as exc:
        raise error(f"{where}: {_describe(exc)}") from None


def read_yaml(path: str, error: type[Exception] = ValueError):
    """The data of the YAML file `path` (`parse_yaml`); unreadable or non-UTF-8 files are one line too."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"--config {path}: cannot read it ({_clip(exc)})") from None
    return parse_yaml(text, f"--config {path}", error)
