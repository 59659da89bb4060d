"""Detector parameters as people type them: `key=value` overrides (CLI) and the Train form's typed fields.

One parser for both, so a value typed on the command line and in the dashboard means the same thing; the
specs (default, type, help) are read from each detector's signature and numpydoc docstrings.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass

from .detectors import get_detector_class


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs; values are Python literals when they parse as one (0.1, (2, 3), None), else strings.
    A pair without "=" is a ValueError (the CLI reports it and exits with status 2)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            try:
                params[key] = float(value)   # "nan" and "inf" are numbers (refused later, by name)
            except ValueError:
                params[key] = value
    return params


# Parameters most detectors share, for docstrings that leave them out.
COMMON_HELP = {"seed": "random seed: the same seed and data give the same model",
               "calibration_fraction": "share of the good training images held out to set thresholds from (0 to "
                                       "0.5; sets under about 100 images are cross-fitted instead)",
               "device": '"auto" uses a CUDA GPU when there is one, else the CPU; or name one: "cpu", "cuda:0"'}


@dataclass(frozen=True)
class ParamSpec:
    """One constructor parameter of a detector: its default, its type (from the default) and help text."""
    name: str
    default: object
    help: str

    @property
    def kind(self) -> str:
        """'bool', 'int', 'float', 'str' or 'literal' (tuples, None and "auto": typed as Python literals, so
        that an "auto" parameter also takes a number or a tuple)."""
        if isinstance(self.default, bool):
            return "bool"
        if self.default == "auto" and self.name != "device":
            return "literal"
        for kind in (int, float, str):
            if isinstance(self.default, kind):
                return kind.__name__
        return "literal"


def param_specs(detector: str) -> list[ParamSpec]:
    """The detector's parameters in signature order, with help from the Parameters sections of its docstrings."""
    cls = get_detector_class(detector)
    helps = {**COMMON_HELP, **_documented_params(cls)}
    signature = inspect.signature(cls.__init__)
    return [ParamSpec(name, p.default, helps.get(name, ""))
            for name, p in signature.parameters.items() if name != "self"]


def parse_value(spec: ParamSpec, text: str):
    """A typed-in value for a 'literal' parameter: a Python literal ((2, 3), None, 0.1) or else the text."""
    return parse_overrides([f"{spec.name}={text}"])[spec.name]


def _documented_params(cls: type) -> dict[str, str]:
    """Help texts of cls and its bases; an "Others : as :class:`.ae.AutoEncoder`" entry brings that class's."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        own = _docstring_params(inspect.cleandoc(klass.__doc__ or ""))
        referred = re.search(r":class:`\.?([\w.]+)`", own.pop("Others", ""))
        if referred:
            module, _, name = referred.group(1).rpartition(".")
            package = klass.__module__.rpartition(".")[0]
            helps.update(_documented_params(getattr(importlib.import_module(f"{package}.{module}"), name)))
        helps.update(own)
    return helps


def _docstring_params(doc: str) -> dict[str, str]:
    """numpydoc 'a, b : text' entries, with indented continuation lines, -> {name: text}."""
    lines = doc.splitlines()
    start = next((i + 2 for i in range(len(lines) - 1)
                  if lines[i].strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}), None)
    if start is None:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line, following in zip(lines[start:], lines[start + 1:] + [""]):
        if following.strip() and set(following.strip()) == {"-"}:
            break                                   # `line` is the next section's title
        entry = re.match(r"^(\w[\w, ]*?)\s*:\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            out.update({n: entry.group(2).strip() for n in names})
        elif line[:1].isspace() and line.strip() and names:
            out.update({n: f"{out[n]} {line.strip()}" for n in names})
        else:
            names = []
    return out
