"""What each registered model is, read from its class and module without building it (`aeflow models`)."""

from __future__ import annotations

import inspect
import sys
import textwrap
from dataclasses import dataclass

from aeflow.errors import ConfigError
from aeflow.models.base import _REGISTRY, available_models


@dataclass(frozen=True)
class ModelFacts:
    name: str
    weights: str  # "weights: <backbone>", "weights: local files" or "no weights needed"
    maps: bool  # pixel anomaly maps by default
    paper: str  # the first paragraph of the model's module docstring, on one line
    doc: str  # the model module's whole docstring
    options: dict[str, object]  # constructor options (-m <model>.<key>=<value>) and their defaults


def _parameters(cls) -> dict[str, inspect.Parameter]:
    """The constructor's named parameters, with those of the parents it forwards **options to (aeflow_gmm ->
    aeflow); the first definition wins, and a class's `parent_option_defaults` replace its parents' defaults."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    for key, value in getattr(cls, "parent_option_defaults", {}).items():
        out[key] = out[key].replace(default=value)
    return out


def model_facts(name: str) -> ModelFacts:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    cls = _REGISTRY[name]
    doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
    params = _parameters(cls)
    backbone = params["backbone"].default if "backbone" in params else None
    pretrained = params["pretrained"].default if "pretrained" in params else backbone is not None
    weights = (f"weights: {backbone}" if pretrained and isinstance(backbone, str) else
               "weights: local files" if pretrained else "no weights needed")
    # the class says whether its maps localise; a model whose maps are an option (k-NN's pixel_level) by default
    option = params.get("pixel_level")
    maps = cls.gives_pixel_maps and (option is None or bool(option.default))
    options = {p.name: (p.default if p.default is not inspect.Parameter.empty else "(required)")
               for p in params.values()}
    return ModelFacts(name, weights, maps, " ".join(doc.split("\n\n")[0].split()), doc, options)


def list_models(width: int = 80) -> str:
    """One line per model, at most `width` columns: name, weights, maps, and the start of its paper line."""
    column = max([16, *map(len, available_models())]) + 1  # a name never runs into the next column
    room = width - column - 28 - 8  # what is left for the paper
    lines = []
    for name in available_models():
        facts = model_facts(name)
        paper = facts.paper if len(facts.paper) <= room else facts.paper[:room - 3] + "..."
        lines.append(f"{name:{column}s}{facts.weights:28s}{'maps' if facts.maps else 'no maps':8s}{paper}")
    return "\n".join(lines)


def describe_model(name: str, width: int = 80) -> str:
    """One model in full, wrapped to `width` columns: its module docstring, the weights it needs, whether it gives
    maps, and its options with their defaults."""
    facts = model_facts(name)
    text = [f"{name}\n  {facts.weights}; {'pixel anomaly maps' if facts.maps else 'image score only (no maps)'}"]
    for paragraph in facts.doc.split("\n\n"):
        text.append(_fill(paragraph, width))
    options = ", ".join(f"{k}={v!r}" for k, v in facts.options.items()) or "none"
    text.append(textwrap.fill(f"options (-m {name}.key=value): {options}", width, initial_indent="  ",
                              subsequent_indent="    "))
    return "\n\n".join(text)


def _fill(paragraph: str, width: int) -> str:
    """A docstring paragraph wrapped, indented by two: list items ("- ") each with a hanging indent, indented
    blocks (commands, tables) kept as written."""
    lines = paragraph.splitlines()
    if lines and all(line.startswith("    ") or not line.strip() for line in lines):
        return "\n".join("  " + line for line in lines)
    items: list[list[str]] = []
    for line in lines:
        if line.startswith("- ") or not items:
            items.append([line])
        else:
            items[-1].append(line)
    out = []
    for item in items:
        words = " ".join(" ".join(item).split())
        hanging = "    " if words.startswith("- ") else "  "
        out.append(textwrap.fill(words, width, initial_indent="  ", subsequent_indent=hanging,
                                 break_on_hyphens=False))
    return "\n".join(out)
