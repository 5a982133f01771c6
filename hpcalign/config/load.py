"""YAML + `key=value` overrides → a checked `Config`; the one place configs are validated.

Errors name the key, the value and what was expected, with a "did you mean" for unknown
keys, and are raised as `ConfigError` so the CLI prints them without a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from hpcalign.config.schema import Config
from hpcalign.errors import ConfigError


def load_config(path: str, overrides: list[str] | tuple[str, ...] = (),
                root: type[BaseModel] = Config) -> Any:
    """Read `path`, apply `key=value` overrides (OmegaConf dotlist), validate as `root`
    (a run's `Config`, or another command's root section, e.g. `train-rm`'s)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        base = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text (byte {err.start}: "
                          f"{err.reason})") from None
    if not isinstance(base, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got a list")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. trainer.lr=1e-5)")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        _fold_policy_shorthand(merged, "model" if "model" in root.model_fields else "models.policy")
        missing = sorted(OmegaConf.missing_keys(merged))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err.__class__.__name__}: {err}") from None
    if missing:  # `???` in a config: a value the user must give
        lines = [f"  {key}: required, no value given ({_field_help(key.split('.'), root)}); "
                 f"add the override {key}=..." for key in missing]
        raise ConfigError("\n".join([f"{path}: {len(missing)} value(s) to set", *lines]))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return config_from_dict(data, source=path, root=root)


def _fold_policy_shorthand(merged: DictConfig, canonical: str) -> None:
    """`model.*` and `models.policy.*` name the same model: fold the other spelling into
    `canonical` (the root's own field), so an override in either completes a `???` of the
    other and the checked config has one."""
    alias = "models.policy" if canonical == "model" else "model"
    value = OmegaConf.select(merged, alias, default=None)
    if value is None:
        return
    target = OmegaConf.select(merged, canonical, default=None)
    folded = OmegaConf.merge(target, value) if isinstance(target, DictConfig) else value
    if alias == "model":
        del merged["model"]
        merged.setdefault("models", {})
        merged.models.policy = folded
    else:
        del merged.models["policy"]
        merged.model = folded


def peek_algorithm(path: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The `algorithm` a config names (after overrides), before it is validated: which root
    section validates it (a run's `Config` for GRPO, `config/dpo.py` for DPO). Errors are
    left to `load_config`: this returns "grpo" for anything it cannot read."""
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(
            [o for o in overrides if "=" in o and not o.startswith("=")]))
        value = merged.get("algorithm", "grpo") if isinstance(merged, DictConfig) else "grpo"
    except Exception:  # noqa: BLE001 - any unreadable config: load_config names the problem
        return "grpo"
    return value if isinstance(value, str) else "grpo"


def config_from_dict(data: dict[str, Any], source: str = "config",
                     root: type[BaseModel] = Config) -> Any:
    """Validate a plain dict (already merged) into a `Config` (or `root`)."""
    nul = _nul_keys(data)
    if nul:  # no path, argv word, environment value or file name can hold one
        raise ConfigError("\n".join([f"{source}: {len(nul)} invalid value(s)", *[
            f"  {key}: NUL bytes are not allowed in config values" for key in nul]]))
    try:
        return root.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, data, source, root)) from None


def _nul_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose value (or key) holds a NUL byte."""
    if isinstance(node, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), k, v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix}[{i}]", None, v) for i, v in enumerate(node)]
    else:
        return [prefix] if isinstance(node, str) and "\0" in node else []
    found = []
    for key, raw_key, value in items:
        if isinstance(raw_key, str) and "\0" in raw_key:
            found.append(key)
        else:
            found += _nul_keys(value, key)
    return found


def _describe(err: ValidationError, data: dict[str, Any], source: str,
              root: type[BaseModel] = Config) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<top>"
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_did_you_mean(loc, root)}")
        elif kind == "missing":
            lines.append(f"  {key}: required key is missing ({_field_help(loc, root)})")
        elif not loc:  # a rule across sections: its message names the keys and values
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        else:
            value = item.get("input")
            msg = item["msg"].removeprefix("Value error, ")
            help_text = _field_help(loc, root)
            expected = f"; expected: {help_text}" if help_text else ""
            lines.append(f"  {key}={value!r}: {msg}{expected}")
    return "\n".join(lines)


def _model_at(loc: list[str], root: type[BaseModel] = Config) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of `loc`."""
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _did_you_mean(loc: list[str], root: type[BaseModel] = Config) -> str:
    model = _model_at(loc, root)
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(loc[:-1])
    if close:
        return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return f" (known keys: {', '.join(model.model_fields)})"


def _field_help(loc: list[str], root: type[BaseModel] = Config) -> str:
    if not loc:  # a rule across sections: its message names the keys
        return ""
    model = _model_at(loc, root)
    field = model.model_fields.get(loc[-1]) if model is not None else None
    return (field.description or "") if field is not None else ""


def _escape_interpolation(node: Any) -> Any:
    """Values as OmegaConf must read them back: a literal `${` is written `\\${` (and the
    backslashes right before it doubled), else `load_config` would resolve it again."""
    if isinstance(node, dict):
        return {key: _escape_interpolation(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_escape_interpolation(value) for value in node]
    if isinstance(node, str) and "${" in node:
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", node)
    return node


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, exactly what ran (written to RUN_DIR/config.yaml);
    `load_config` reads it back equal."""
    return yaml.safe_dump(_escape_interpolation(cfg.model_dump(mode="json")), sort_keys=False)
