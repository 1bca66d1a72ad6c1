"""Read a preset, apply ``key.sub=value`` overrides, validate, and explain every failure in one line."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from hkft.config import schema
from hkft.config.schema import HkftConfig
from hkft.errors import ConfigError, kind_of

_SCHEMA_MODEL_NAMES = {name for name, value in vars(schema).items() if isinstance(value, type) and issubclass(value, BaseModel)}

PRESET_SUFFIXES = (".yaml", ".yml")
# Nodes a YAML document may expand to once its aliases are followed. The largest shipped study is a few
# hundred; a 700-byte file of nested anchors would otherwise expand to billions (a "billion laughs").
MAX_YAML_NODES = 100_000
STUDY_KEYS = ("base", "grid")


def presets_dir() -> Path:
    """Presets ship inside the wheel (hkft/presets) and live at the repository root in a checkout."""
    packaged = Path(__file__).resolve().parent.parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "presets"


def preset_files(directory: Path) -> list[Path]:
    """The presets in ``directory``: its YAML files, either suffix, by name."""
    return sorted(path for path in directory.iterdir() if path.suffix in PRESET_SUFFIXES and path.is_file())


def shipped_preset(name: str) -> Path | None:
    """The shipped preset called ``name``: NAME.yaml or NAME.yml, or the file NAME names with its suffix."""
    candidates = [name] if name.endswith(PRESET_SUFFIXES) else [name + suffix for suffix in PRESET_SUFFIXES]
    return next((path for path in (presets_dir() / file for file in candidates) if path.is_file()), None)


def resolve_preset_path(preset: str) -> Path:
    """A path to a YAML file, or the name of a shipped preset (``quickstart``)."""
    path = Path(preset)
    if path.is_file():
        return path
    shipped = shipped_preset(preset)
    if shipped is not None:
        return shipped
    names = [p.stem for p in preset_files(presets_dir())]
    suggestion = _did_you_mean(path.stem, names)
    hint = f"did you mean {suggestion}?" if suggestion else f"shipped presets: {', '.join(names)}"
    raise ConfigError(f"{preset}: no such preset file", hint)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} appears twice, at lines {first_line} and {line}")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping, silently; a preset should not."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden, which is what merging is for
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKeyError(key, first_lines[key], line)
            first_lines[key] = line
        return super().construct_mapping(node, deep)


class YamlTooLargeError(yaml.YAMLError):
    def __init__(self, nodes: int):
        super().__init__(f"its aliases expand to more than {MAX_YAML_NODES:,} values ({nodes:.3g})")


def expanded_size(node: yaml.Node, sizes: dict[int, int] | None = None) -> int:
    """How many nodes ``node`` stands for once every alias is replaced by a copy of its anchor.
    An alias is the same node object as its anchor, so counting each node once (memoised) is fast
    however large the expansion."""
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive anchor (`&a [*a]`) counts once instead of looping
        children = node.value if isinstance(node, yaml.CollectionNode) else []
        pairs = (item for child in children for item in (child if isinstance(child, tuple) else (child,)))
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in pairs)
    return sizes[id(node)]


def load_bounded_yaml(text: str) -> Any:
    """yaml.load with unique keys and a bound on the size aliases expand to, checked before anything is built."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = expanded_size(node)
        if nodes > MAX_YAML_NODES:
            raise YamlTooLargeError(nodes)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = load_bounded_yaml(text)
    except YamlTooLargeError as err:
        raise ConfigError(f"{path}: {err}", "write the values out instead of nesting anchors") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}", "keep one of them") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}", "fix the indentation or quoting there") from None
    if data is None:
        raise ConfigError(f"{path}: the preset is empty", "start from `hkft config quickstart`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the preset must be a mapping of sections, not {kind_of(data)}")
    return data


def parse_override(override: str) -> tuple[list[str], Any]:
    """``lora.r=16`` -> (["lora", "r"], 16); the value is parsed as YAML so types come out right."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form key.sub=value", "e.g. --set lora.r=16")
    try:
        value = load_bounded_yaml(raw) if raw.strip() else None
    except YamlTooLargeError as err:
        raise ConfigError(f"override {key}: {err}", "write the values out instead of nesting anchors") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # `data.train=hub:` or `template=Q: {q}` is text; a mapping is written {key: value}
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        keys, value = parse_override(override)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(keys[: depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(preset: str | Path, overrides: list[str] | None = None, *, overrides_from: str | None = None) -> HkftConfig:
    """``overrides_from``: how the user gave ``overrides`` (``--set``), named in an error they cause;
    a study names their source itself (``search train.lr=...``)."""
    path = resolve_preset_path(str(preset))
    data = read_yaml_mapping(path)
    check_not_a_study(data, path)
    overrides = list(overrides or [])
    config = validate_config(apply_overrides(data, overrides), source=str(path), overrides=overrides,
                             overrides_from=overrides_from)
    return anchor_data_paths(config, path.resolve().parent)


def check_not_a_study(data: dict[str, Any], path: Path) -> None:
    """A study file (base + grid) given where a preset is expected would fail on a missing model: say what it is."""
    if "model" not in data and any(key in data for key in STUDY_KEYS):
        raise ConfigError(f"{path} is a study file (it has {', '.join(k for k in STUDY_KEYS if k in data)}), not a preset",
                          f"run it with `hkft sweep {path}`")


def blamed_override(err: ValidationError, overrides: list[str]) -> str | None:
    """The last override that set the failing key (or a section above it), or that set a key inside
    the failing section which a rule across keys names in its message (``data.packing is for
    causal-lm``); None when the preset file is to blame."""
    first = _most_specific(err.errors())
    failing = [str(part) for part in _without_union_branches(first["loc"])]
    for override in reversed(overrides):
        keys = parse_override(override)[0]
        named = re.search(rf"(?<![\w.]){re.escape('.'.join(keys))}(?!\w)", first["msg"]) is not None
        if failing[: len(keys)] == keys or (keys[: len(failing)] == failing and named):
            return override
    return None


def anchor_data_paths(config: HkftConfig, preset_dir: Path) -> HkftConfig:
    """Relative data files are looked up next to the preset first (as docker-compose does), then in
    the working directory; the resolved config stores absolute paths so a run reproduces anywhere."""
    for split in ("train", "validation", "test"):
        source = getattr(config.data, split)
        if not isinstance(source, str) or source.startswith("hub:") or Path(source).is_absolute():
            continue
        beside_preset = preset_dir / source
        chosen = beside_preset if beside_preset.exists() or not Path(source).exists() else Path(source).resolve()
        setattr(config.data, split, str(chosen))
    return config


def validate_config(data: dict[str, Any], source: str = "config", overrides: list[str] | None = None,
                    overrides_from: str | None = None) -> HkftConfig:
    """``overrides``: those applied to ``data``; an error in a key one of them set is blamed on it,
    as ``{overrides_from} {override}`` (``--set lora.r=0``), or on nothing when ``overrides_from`` is
    None (the caller says where they came from); any other error on ``source``."""
    try:
        return HkftConfig.model_validate(data)
    except ValidationError as err:
        override = blamed_override(err, list(overrides or []))
        if override is None:
            blame = f"{source}: "
        else:
            blame = f"{overrides_from} {override}: " if overrides_from else ""
        raise ConfigError(f"{blame}{describe_validation_error(err)}") from None


def describe_validation_error(err: ValidationError) -> str:
    """The first problem, as ``section.key: what is wrong (did you mean ...)``; more are counted."""
    errors = err.errors()
    first = _most_specific(errors)
    *path, last = first["loc"] or ("",)
    loc = [str(part) for part in path if not _is_union_branch(part)]
    if first["type"] == "extra_forbidden" or not _is_union_branch(last):  # an unknown key is the user's, whatever its spelling
        loc.append(str(last))
    where = ".".join(loc) or "top level"
    if not where.isprintable():  # a key with a newline (from an override) would break the one-line error
        where = repr(where)
    if first["type"] == "extra_forbidden":
        valid = _field_names_at(HkftConfig, loc[:-1])
        suggestion = _did_you_mean(loc[-1], valid)
        prefix = ".".join(loc[:-1])
        hint = f"did you mean {prefix + '.' if prefix else ''}{suggestion}?" if suggestion else f"valid keys: {', '.join(valid)}"
        message = f"{where}: unknown key ({hint})"
    elif first["type"] == "missing":
        message = f"{where}: required key is missing"
    else:
        text = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        # A rule across keys (a model validator) names its keys itself and gets a whole section as
        # input: echoing that section back would bury the message.
        if isinstance(value, dict):
            message = text if where == "top level" else f"{where}: {text}"
        else:
            message = f"{where}: {text} (got {value!r})"
    if len(errors) > 1:
        message += f" [and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}]"
    return message


def _most_specific(errors: list) -> dict:
    """A union reports a mismatch per member; the one that got furthest into the value says what is wrong."""
    key = _without_union_branches(errors[0]["loc"])
    related = [error for error in errors if _without_union_branches(error["loc"])[: len(key)] == key]
    return max(related, key=lambda error: len(error["loc"]))


def _without_union_branches(loc: tuple) -> list:
    return [part for part in loc if not _is_union_branch(part)]


def _is_union_branch(part: Any) -> bool:
    """pydantic inserts the union member's name into ``loc`` (e.g. ``str``, ``HubSource``, ``literal['auto']``)."""
    return isinstance(part, str) and (
        part in _SCHEMA_MODEL_NAMES or part in ("str", "int", "float", "bool") or part.startswith(("list[", "literal[", "function-"))
    )


def _field_names_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for key in path:
        field = model.model_fields.get(key)
        if field is None:
            return []
        nested = _model_in(field.annotation)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def preset_keys(model: type[BaseModel] = HkftConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``train.lr``, ``eval.generation.num_beams`` ...)."""
    keys = []
    for name, field in model.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        keys.extend(preset_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"])
    return keys


def _did_you_mean(word: str, candidates: list[str]) -> str | None:
    by_lower = {candidate.lower(): candidate for candidate in candidates}
    matches = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return by_lower[matches[0]] if matches else None


def config_to_yaml(config: HkftConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
