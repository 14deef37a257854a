"""Looking a config-named component up in a detectron2 registry, with a useful error."""
from detectron2.utils.registry import Registry


def lookup(registry: Registry, name: str, key: str):
    """The object registered as ``name``; a KeyError naming the config ``key`` and every
    registered name otherwise (detectron2's own message names neither)."""
    if name not in registry:
        raise KeyError(
            f"{key}={name!r} is not registered in {registry._name}; registered: "
            f"{sorted(k for k, _ in registry)}"
        )
    return registry.get(name)
