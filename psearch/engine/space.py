"""The search space a user writes in YAML (--space space.yaml): read and checked once, then
suggested trial by trial. One top-level key per parameter, suggested in the file's order::

    model_type: {type: categorical, choices: [convnext, vit]}
    lr:                                  # a list: the first entry whose `when` holds is used
      - {type: float, low: 3.0e-4, high: 3.0e-3, log: true, when: {model_type: vit}}
      - {type: float, low: 1.0e-5, high: 5.0e-4, log: true}
    warmup_epochs: {type: int, low: 0, high: 5, step: 1}
    loss: {type: categorical, choices: [ce, focal]}
    smoothing: [{value: 0.0, when: {loss: focal}}, {type: float, low: 0.0, high: 0.2}]
    embedding_dim: 256                   # a plain value: fixed, not searched

An entry has `type` float (low, high, log, step), int (low, high, step, log) or categorical
(choices), or `value` (fixed); `when` maps parameters defined above to a value or a list of values.
A parameter none of whose entries applies is left out of the trial. Optuna keeps one kind per
parameter name in a study, so one parameter's entries must agree in type, log and choices; a fixed
number beside a float or int range is suggested as a one-point range of that kind.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Collection, Mapping

import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution, check_distribution_compatibility)
from optuna.trial import BaseTrial

from psearch.engine.errors import UsageError

DEFAULT_SOURCE = "the default space"
SPACE_VAR = "PSEARCH_SPACE"  # a worker's --space file, for a user's objective (see `given`)
_RANGE_KEYS = {"type", "low", "high", "log", "step", "when"}
_KEYS = {"float": _RANGE_KEYS, "int": _RANGE_KEYS, "categorical": {"type", "choices", "when"}}
_FIXED_KEYS = {"value", "when"}
# Parameter names: identifiers, dotted for a Hydra app's nested settings (optimizer.lr).
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# PyYAML reads YAML 1.1, where a float needs a dot: `1e-4` loads as the string '1e-4'.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (str, int, float, bool))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal, except that a bool never equals a number (YAML's `true` is not 1)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _scalar(x: Any) -> Any:
    """`x`, with YAML 1.1's dotless exponents ('1e-4') read as the numbers the user meant."""
    return float(x) if isinstance(x, str) and _EXPONENT_NUMBER.fullmatch(x) else x


@dataclass(frozen=True)
class Entry:
    """One distribution (or a fixed value) of a parameter, used when its conditions hold."""
    distribution: BaseDistribution | None  # None for a fixed value
    value: Any = None
    when: tuple[tuple[str, tuple], ...] = ()  # (earlier parameter, its allowed values), by name

    def applies(self, given: Mapping[str, Any]) -> bool:
        """Whether every parameter named in `when` was given one of its allowed values."""
        return _status(self, given, ()) is True


def _status(entry: Entry, given: Mapping[str, Any], unsure: Collection[str]) -> bool | None:
    """Whether `entry` applies: True, False, or None when it hangs on a parameter in `unsure`."""
    status: bool | None = True
    for name, allowed in entry.when:
        if name in given:
            if not any(_same(given[name], a) for a in allowed):
                return False
        elif name in unsure:
            status = None
        else:
            return False
    return status


def _first(entries: tuple[Entry, ...], given: Mapping[str, Any]) -> Entry | None:
    return next((entry for entry in entries if entry.applies(given)), None)


@dataclass(frozen=True)
class Space:
    """The checked parameters in file order, each with its entries; `source` names the file."""
    params: tuple[tuple[str, tuple[Entry, ...]], ...]
    source: str = field(default=DEFAULT_SOURCE, compare=False)  # where it was read: not its meaning

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.params)

    def suggest(self, trial: BaseTrial) -> dict[str, Any]:
        """Suggest each parameter whose entry applies, in file order, on an Optuna trial."""
        out: dict[str, Any] = {}
        for name, entries in self.params:
            entry = _first(entries, out)
            if entry is not None:
                out[name] = _suggest_one(trial, name, _suggested(entry, entries))
        return out

    def applicable(self, values: Mapping[str, Any]) -> dict[str, Entry]:
        """The entry that applies to each parameter, conditions evaluated in order on `values`."""
        known: dict[str, Any] = {}
        out = {}
        for name, entries in self.params:
            entry = _first(entries, known)
            if entry is not None:
                out[name] = entry
                if name in values:
                    known[name] = values[name]
        return out

    def check_values(self, values: Mapping[str, Any], partial: bool = False) -> str | None:
        """None when `values` fit, else a one-line reason; `partial`: parameters may be missing."""
        # A partial set's missing parameters are sampled; a value whose entry hangs on one of them
        # need only fit some entry that may apply.
        strangers = [name for name in values if name not in self.names]
        if strangers:
            return f"unknown parameter {strangers[0]!r} (the space has {', '.join(self.names)})"
        given: dict[str, Any] = {}
        unsure: set[str] = set()
        for name, entries in self.params:
            reason = _check_one(name, entries, values, given, unsure, partial)
            if reason:
                return reason
        return None

    def distributions(self, values: Mapping[str, Any]) -> dict[str, BaseDistribution]:
        """The distribution each parameter in `values` was suggested with (for create_trial)."""
        reason = self.check_values(values, partial=True)
        if reason:
            raise UsageError(f"{self.source}: {reason}; fix the value or leave it out")
        entries = dict(self.params)
        dists = {name: _suggested(entry, entries[name])
                 for name, entry in self.applicable(values).items() if name in values}
        unused = [name for name in values if name not in dists]
        if unused:
            raise UsageError(f"{self.source}: {unused[0]} is not used with these values; drop it")
        return dists

    def to_data(self) -> dict[str, list[dict]]:
        """JSON-ready canonical form: files that mean the same thing give equal data."""
        return {name: [_entry_data(entry) for entry in entries] for name, entries in self.params}

    def to_yaml(self) -> str:
        """YAML text that loads back to an equal space, one parameter per line where it fits."""
        return "".join(_param_yaml(name, entries) for name, entries in self.params)

    def with_first(self, name: str, entry_or_value: Entry | Any) -> Space:
        """A copy with parameter `name` (an Entry, a fixed value or an entry mapping) put first."""
        if name in self.names:
            raise ValueError(f"{name!r} is already in {self.source}; only add a missing parameter")
        if isinstance(entry_or_value, Entry):
            if entry_or_value.when:
                raise ValueError(f"the first parameter {name!r} cannot have conditions")
            entries = (entry_or_value,)
        else:
            entries = parse({name: entry_or_value}, self.source).params[0][1]
        return Space(((name, entries),) + self.params, self.source)

    def without(self, name: str) -> Space:
        """A copy without parameter `name` (if there); a condition on it then never holds."""
        return Space(tuple(p for p in self.params if p[0] != name), self.source)


def _suggested(entry: Entry, entries: tuple[Entry, ...]) -> BaseDistribution:
    """The distribution `entry` is suggested with (a fixed value's: see below)."""
    # Optuna refuses a second kind (or other choices) for one name in a study, so a fixed number
    # takes its siblings' kind as a one-point range; other fixed values: a one-choice categorical.
    if entry.distribution is not None:
        return entry.distribution
    value = entry.value
    kind = next((e.distribution for e in entries if e.distribution is not None), None)
    fixed = [e.value for e in entries]
    if kind is None and len(set(map(repr, fixed))) > 1 and all(map(_is_number, fixed)):
        kind = IntDistribution(0, 1) if all(map(_is_int, fixed)) else FloatDistribution(0, 1)
    if isinstance(kind, FloatDistribution) and _is_number(value) and (value > 0 or not kind.log):
        return FloatDistribution(value, value, log=kind.log)
    if isinstance(kind, IntDistribution) and _is_int(value) and (value >= 1 or not kind.log):
        return IntDistribution(value, value, log=kind.log)
    return CategoricalDistribution([value])


def _suggest_one(trial: BaseTrial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(name, list(dist.choices))


def _candidates(entries: tuple[Entry, ...], given: Mapping[str, Any],
                unsure: Collection[str]) -> tuple[list[Entry], bool]:
    """The entries that may apply (in order) and whether one of them surely does."""
    out = []
    for entry in entries:
        status = _status(entry, given, unsure)
        if status is not False:
            out.append(entry)
        if status:
            return out, True
    return out, False


def _check_one(name: str, entries: tuple[Entry, ...], values: Mapping[str, Any],
               given: dict[str, Any], unsure: set[str], partial: bool) -> str | None:
    """Why `values[name]` fits no entry that may apply, or None; notes `name` in given/unsure."""
    candidates, sure = _candidates(entries, given, unsure)
    if name in values:
        if not candidates:
            return f"{name} is not used when {_failing(entries[0], given, unsure)}"
        misfits = [_misfit(entry, values[name]) for entry in candidates]
        if all(misfits):
            return f"{name} {values[name]!r} {misfits[0]}"
    elif sure and not partial:
        return f"missing {name!r}"
    if name in values and sure:
        given[name] = values[name]
    elif sure and len(candidates) == 1 and candidates[0].distribution is None:
        given[name] = candidates[0].value
    elif candidates:
        unsure.add(name)
    return None


def _failing(entry: Entry, given: Mapping[str, Any], unsure: Collection[str]) -> str:
    """The first condition of `entry` that surely fails, in words."""
    name = next(name for name, allowed in entry.when if name not in unsure and (
        name not in given or not any(_same(given[name], a) for a in allowed)))
    return f"{name} is {given[name]!r}" if name in given else f"{name} is not set"


def _misfit(entry: Entry, value: Any) -> str | None:
    """Why `value` is not one that `entry` can give, or None when it is."""
    dist = entry.distribution
    if dist is None:
        return None if _same(value, entry.value) else f"is not the fixed value {entry.value!r}"
    if isinstance(dist, CategoricalDistribution):
        ok = any(_same(value, choice) for choice in dist.choices)
        return None if ok else f"is not one of {list(dist.choices)!r}"
    if isinstance(dist, IntDistribution) and not _is_int(value):
        return "is not an int"
    if not _is_number(value):
        return "is not a number"
    if value < dist.low or value > dist.high:
        return f"is below low {dist.low}" if value < dist.low else f"is above high {dist.high}"
    steps = (value - dist.low) / dist.step if dist.step else 0
    if not math.isclose(steps, round(steps), abs_tol=1e-8):
        return f"is not on the grid {dist.low} + k * {dist.step}"
    return None


def _entry_data(entry: Entry) -> dict[str, Any]:
    """An entry with every key explicit (see Space.to_data)."""
    dist = entry.distribution
    if dist is None:
        data: dict[str, Any] = {"value": entry.value}
    elif isinstance(dist, CategoricalDistribution):
        data = {"type": "categorical", "choices": list(dist.choices)}
    else:
        kind = "float" if isinstance(dist, FloatDistribution) else "int"
        data = {"type": kind, "low": dist.low, "high": dist.high, "log": dist.log,
                "step": dist.step}
    return {**data, "when": {name: list(allowed) for name, allowed in entry.when}}


def texts(data: Mapping[str, Any]) -> dict[str, str]:
    """Stored space data (Space.to_data) as each parameter's YAML on one line, for messages that
    name what differs: {'lr': '{type: float, low: 0.001, high: 0.01, log: true}'}."""
    return {name: " ".join(_param_yaml(name, entries).split(":", 1)[1].split())
            for name, entries in from_data(data, "the stored space").params}


def _param_yaml(name: str, entries: tuple[Entry, ...]) -> str:
    """One parameter as YAML lines, defaults left out."""
    items = []
    for entry in entries:
        data = _entry_data(entry)
        defaults = {"when": {}, "log": False, "step": 1 if data.get("type") == "int" else None}
        items.append({k: v for k, v in data.items() if k not in defaults or v != defaults[k]})
    if len(items) == 1 and list(items[0]) == ["value"]:
        return f"{_flow(name)}: {_flow(items[0]['value'])}\n"
    line = f"{_flow(name)}: {_flow(items[0] if len(items) == 1 else items)}\n"
    if len(line) <= 100:
        return line
    return f"{_flow(name)}:\n" + "".join(f"  - {_flow(item)}\n" for item in items)


def _flow(x: Any) -> str:
    """`x` as one line of YAML in flow style."""
    text = yaml.safe_dump(x, default_flow_style=True, sort_keys=False, width=10**9)
    return text.removesuffix("\n...\n").strip()


def _read_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                         "check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise UsageError(f"{path}: malformed YAML{where}: {problem}; fix the syntax "
                         "there") from None


def _shown(data: Any) -> str:
    if data is None:
        return "nothing"
    kind = {dict: "mapping", list: "list"}.get(type(data))
    return (f"a {kind}" if data else f"an empty {kind}") if kind else f"{data!r}"


def load(path: str | Path, known: Collection[str] | None = None,
         implicit: Collection[str] = ()) -> Space:
    """Read and check a space file (see the module docstring)."""
    return parse(_read_yaml(path), str(path), known, implicit)


def given(environ: Mapping[str, str] | None = None) -> Space | None:
    """In a worker: the space of the --space file (named by SPACE_VAR), or None without one."""
    path = (os.environ if environ is None else environ).get(SPACE_VAR)
    return load(path) if path else None


def parse(data: Any, source: str, known: Collection[str] | None = None,
          implicit: Collection[str] = ()) -> Space:
    """Check loaded YAML data; `known`: the names an objective takes, `implicit`: see below."""
    # `implicit` names may appear in a `when` though the objective, not the file, defines them
    # (model_type from --models, added later with Space.with_first).
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{source}: holds {_shown(data)}, not a mapping of parameter names; write "
                         "lines like `lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}`")
    params: list[tuple[str, tuple[Entry, ...]]] = []
    for name, raw in data.items():
        _check_name(source, name, known)
        earlier = set(implicit) | {n for n, _ in params}
        entries = _parse_param(f"{source}: {name}", raw, earlier)
        _check_together(f"{source}: {name}", entries)
        params.append((name, entries))
    return Space(tuple(params), source)


def from_data(data: Mapping[str, Any], source: str) -> Space:
    """The space that Space.to_data gave `data`."""
    referenced = {name for entries in data.values() for e in entries for name in e["when"]}
    return parse(dict(data), source, implicit=referenced)


def _check_name(source: str, name: Any, known: Collection[str] | None) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(f"{source}: parameter name {name!r} is not a name; use letters, "
                         "digits, _ and dots like learning_rate or optimizer.lr")
    if known is not None and name not in known:
        raise UsageError(f"{source}: unknown parameter {name!r}; the objective accepts "
                         f"{', '.join(sorted(known))}")


def _parse_param(where: str, raw: Any, earlier: set[str]) -> tuple[Entry, ...]:
    if raw is None:
        raise UsageError(f"{where}: has no value; give a range like {{type: float, low: 0.1, "
                         "high: 1.0}, a list of entries or a fixed value")
    if isinstance(raw, dict):
        return (_parse_entry(where, raw, earlier),)
    if isinstance(raw, list):
        return _parse_list(where, raw, earlier)
    if _is_scalar(raw):
        return (Entry(None, _scalar(raw)),)
    raise UsageError(f"{where}: {raw!r} is not a number, string, bool, range or list of entries; "
                     "quote it to make it a string")


def _parse_list(where: str, raw: list, earlier: set[str]) -> tuple[Entry, ...]:
    if not raw:
        raise UsageError(f"{where}: is an empty list; give entries like {{type: float, low: 0.1, "
                         "high: 1.0}")
    if not any(isinstance(item, dict) for item in raw):
        raise UsageError(f"{where}: is a plain list {_flow(raw)}; to search these values write "
                         f"{{type: categorical, choices: {_flow(raw)}}}")
    entries: list[Entry] = []
    for i, item in enumerate(raw, 1):
        at = f"{where} entry {i}"
        if not isinstance(item, dict):
            raise UsageError(f"{at}: {item!r} is not a mapping; write each entry as "
                             "{type: ..., when: {...}} or {value: ..., when: {...}}")
        if entries and not entries[-1].when:
            raise UsageError(f"{at}: is never used, since entry {i - 1} has no `when`; move entry "
                             f"{i - 1} last or give it a when")
        entries.append(_parse_entry(at, item, earlier))
    return tuple(entries)


def _parse_entry(where: str, raw: dict, earlier: set[str]) -> Entry:
    kind = raw.get("type")
    if "value" in raw:
        _check_keys(where, raw, _FIXED_KEYS, "a fixed entry")
        if not _is_scalar(raw["value"]):
            raise UsageError(f"{where}: value {raw['value']!r} is not a number, string or bool; "
                             "give one plain value")
        return Entry(None, _scalar(raw["value"]), _parse_when(where, raw.get("when"), earlier))
    if not isinstance(kind, str) or kind not in _KEYS:
        problem = f"type {kind!r} is not one of" if "type" in raw else "has no type; add type:"
        raise UsageError(f"{where}: {problem} float, int or categorical (or value: X for a fixed "
                         "value)")
    _check_keys(where, raw, _KEYS[kind], f"a {kind} entry")
    dist = _categorical(where, raw) if kind == "categorical" else _range(where, raw, kind)
    return Entry(dist, None, _parse_when(where, raw.get("when"), earlier))


def _check_keys(where: str, raw: dict, allowed: set[str], what: str) -> None:
    extra = [key for key in raw if key not in allowed]
    if extra:
        raise UsageError(f"{where}: unknown key {extra[0]!r}; {what} takes "
                         f"{', '.join(sorted(allowed))}")


def _range(where: str, raw: dict, kind: str) -> FloatDistribution | IntDistribution:
    """A float or int range, refusing what Optuna would refuse or silently change."""
    number = float if kind == "float" else int
    missing = [key for key in ("low", "high") if raw.get(key) is None]
    if missing:
        raise UsageError(f"{where}: {missing[0]} is missing; add {missing[0]}: <number>")
    low, high = (_number(where, key, raw[key], number) for key in ("low", "high"))
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise UsageError(f"{where}: log {log!r} is not true or false; write log: true or drop it")
    if low >= high:
        raise UsageError(f"{where}: low {low} is not below high {high}; make low smaller than "
                         "high (or use value: X for a fixed value)")
    if log and (low <= 0 if number is float else low < 1):
        need = "above 0" if number is float else "at least 1"
        raise UsageError(f"{where}: log: true needs low {need}, got low {low}; raise low or "
                         "drop log")
    step = _step(where, raw.get("step"), number, low, high, log)
    if number is float:
        return FloatDistribution(low, high, log=log, step=step)
    return IntDistribution(low, high, log=log, step=step)


def _step(where: str, raw: Any, number: type, low: float, high: float, log: bool) -> Any:
    if raw is None:
        return None if number is float else 1
    step = _number(where, "step", raw, number)
    if step <= 0:
        raise UsageError(f"{where}: step {step} is not above 0; give a positive step or drop it")
    if log and (number is float or step != 1):
        raise UsageError(f"{where}: log: true cannot go with step {step} (Optuna forbids it); drop "
                         "one of them")
    span = Decimal(str(high)) - Decimal(str(low))
    if span % Decimal(str(step)):
        raise UsageError(f"{where}: step {step} does not divide high - low = {span} (Optuna would "
                         "quietly lower high); make high - low a multiple of step")
    return step


def _number(where: str, key: str, x: Any, number: type) -> Any:
    """A bound or step: an int for int ranges, a finite float (or text like '1e-4') for floats."""
    if number is int:
        if _is_int(x):
            return x
        raise UsageError(f"{where}: {key} {x!r} is not a whole number; an int range takes "
                         "integers like 0 or 5 (use type: float for fractions)")
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            pass
    if _is_number(x) and math.isfinite(x):
        return float(x)
    raise UsageError(f"{where}: {key} {x!r} is not a number; write a number like 1.0e-4")


def _categorical(where: str, raw: dict) -> CategoricalDistribution:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UsageError(f"{where}: choices {choices!r} is not a non-empty list; write "
                         "choices: [a, b]")
    bad = [c for c in choices if not _is_scalar(c)]
    if bad:
        raise UsageError(f"{where}: choice {bad[0]!r} is not a number, string or bool; list "
                         "plain values")
    choices = [_scalar(c) for c in choices]
    for i, choice in enumerate(choices):
        if choice in choices[:i]:  # Optuna finds a choice by ==, so 1 and true are one choice
            raise UsageError(f"{where}: choices repeat {choice!r}; list each choice once")
    return CategoricalDistribution(choices)


def _parse_when(where: str, raw: Any, earlier: set[str]) -> tuple[tuple[str, tuple], ...]:
    """Conditions in canonical form: by name, each with its distinct allowed values sorted."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: when {raw!r} is not a mapping; write when: {{model_type: vit}}")
    return tuple(sorted(_condition(where, name, allowed, earlier) for name, allowed in raw.items()))


def _condition(where: str, name: Any, allowed: Any, earlier: set[str]) -> tuple[str, tuple]:
    if name not in earlier:
        raise UsageError(f"{where}: when names {name!r}, which is not a parameter defined above; "
                         "a condition may only use parameters that come earlier in the file")
    values = allowed if isinstance(allowed, list) else [allowed]
    if not values or not all(map(_is_scalar, values)):
        raise UsageError(f"{where}: when {name}: {allowed!r} is not a value or a list of values; "
                         f"write when: {{{name}: [a, b]}}")
    values = [_scalar(v) for v in values]
    distinct = [v for i, v in enumerate(values) if not any(_same(v, u) for u in values[:i])]
    return name, tuple(sorted(distinct, key=lambda v: (type(v).__name__, v)))


def _check_together(where: str, entries: tuple[Entry, ...]) -> None:
    """Refuse entries that Optuna would refuse to record under one name in one study."""
    first = _suggested(entries[0], entries)
    for i, entry in enumerate(entries[1:], 2):
        try:
            check_distribution_compatibility(first, _suggested(entry, entries))
        except ValueError as exc:
            raise UsageError(f"{where}: entry {i} does not fit entry 1 ({exc}); Optuna keeps one "
                             "type, log setting and choices list per parameter in a study: make "
                             "the entries agree or use another parameter name") from None


def load_sets(path: str | Path, space: Space | None = None) -> list[dict[str, Any]]:
    """--enqueue's YAML list of (partial) parameter sets, checked; repeats dropped, order kept."""
    data = _read_yaml(path)
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: holds {_shown(data)}, not a list of parameter sets; write "
                         "lines like `- {lr: 0.001, model_type: vit}`")
    sets: list[dict[str, Any]] = []
    for i, item in enumerate(data, 1):
        params = _parse_set(f"{path}: set {i}", item, space)
        if params not in sets:
            sets.append(params)
    return sets


def _parse_set(where: str, item: Any, space: Space | None) -> dict[str, Any]:
    if not isinstance(item, dict) or not item:
        raise UsageError(f"{where}: {item!r} is not a mapping of parameter names to values; write "
                         "- {lr: 0.001}")
    bad = [key for key, value in item.items() if not isinstance(key, str) or not _is_scalar(value)]
    if bad:
        raise UsageError(f"{where}: {bad[0]}: {item[bad[0]]!r} is not a single value; give one "
                         "number, string or bool per parameter")
    params = {key: _scalar(value) for key, value in item.items()}
    reason = space.check_values(params, partial=True) if space is not None else None
    if reason:
        raise UsageError(f"{where}: {reason}; fix the value or leave it out to have it sampled")
    return params
