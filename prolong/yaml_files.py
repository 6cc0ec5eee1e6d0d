"""Reading YAML that people write (recipes, evaluation configs): a key given twice is an error.

Plain YAML keeps the last of two equal keys without a word, so the value a run uses would not be
the one its author read. Light on purpose (yaml only): every CLI imports it.
"""

from __future__ import annotations

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in any mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (the file sets it twice; keep one)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(stream):
    return yaml.load(stream, Loader=UniqueKeyLoader)
