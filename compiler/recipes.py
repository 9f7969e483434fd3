"""Quantization recipes: a name the user types (or a recipe file) -> the passes that realize it.

Named recipes:

* ``float``: the model unquantized.
* ``w{8,4}a16[-g<G>][-sym|-asym]``: weight-only.  ``w8a16`` is int8 symmetric
  per channel, ``w4a16-g128`` int4 asymmetric in groups of 128 along K.
* ``w8a8``: int8 symmetric per-channel weights, int8 per-token (dynamic)
  activations, integer GEMM (dequant-after-gemm).  ``w8a8-static``: the same
  with one calibrated int8 scale per activation tensor (needs calibration).
* ``w4a8-g128``: int4 asymmetric weights in groups of 128, int8 per-token
  activations; per-group i32 partial sums (QServe's W4A8 shape).
* ``w4a4``: int4 symmetric per-channel weights, int4 per-token activations
  (QuaRot's format; accurate only with an outlier-removing rotation first,
  see ``w4a4-had``).  Symmetric per-channel weights keep the GEMM a plain
  int4 x int4 dot product with one scale per output, as int4 tensor cores need.
  The weights' per-channel scales clip the range where that lowers the
  rounding error (quantize-weights' ``clip-search``), in every w4a4 preset.
* ``llm-int8``: LLM.int8(): input columns whose calibrated absmax exceeds 6.0
  stay float (split-outliers), the rest is w8a8.  Needs calibration.
  ``llm-int8-dynamic``: the columns chosen per call from that call's rows, as
  bitsandbytes does (no calibration); the float columns meet the int8 weights.
* ``w8a8-had``, ``w4a4-had``: QuaRot: the residual stream rotated by a random
  Hadamard matrix, an online Hadamard transform on the down projections' input;
  the int4 presets also clip activations at 0.9 of each row's absmax
  (``int4_sym_token_clip0.9``, QuaRot's ratio).
* ``w4a4-reorder``, ``w4a4-had-reorder``: (w4a4-had's rotation, then) each
  linear's 32 largest input channels split off (reorder-channels) and kept
  int8 weights / int8 activations (the override ``:outliers$``), as Atom does.
* ``w8a8-smooth``, ``w4a16-g128-awq``: SmoothQuant, AWQ scaling first.
* ``<preset>-gptq``: any preset with integer weights (``w8a16-gptq``,
  ``w4a16-g128-gptq``, ``w8a8-had-gptq``, ``llm-int8-gptq``,
  ``w4a4-had-reorder-gptq``, ...) with GPTQ's error-compensating rounding
  instead of round-to-nearest, for every weight (overrides included), on the
  same scales and layout.  Needs calibration.

A recipe file (``--quant my.json`` or ``.toml``, or a dict to ``qcc.compile``)::

    {"weight_format": "int4_asym_g128", "act_format": "int8_sym_token",
     "passes": ["split-outliers{threshold=4.0}"],
     "overrides": [{"pattern": "lm_head", "weight_format": "int8_sym_channel", "act_format": "none"}]}

``passes`` run on the float model before quantization; ``weight_pass``
(default ``quantize-weights``, or e.g. ``gptq``) quantizes the weights, with the extra
options ``weight_options`` (e.g. ``"clip-search=20"``); ``overrides`` are
tried in order, first match wins, ``pattern`` a regex searched in the weight
name (``re.search``); a missing format in an override inherits the recipe's.
Each override becomes its own quantize-weights / quantize-activations instance
restricted (through ``exclude``) to the layers it matches.
"""

import dataclasses
import json
import os
import re

from qcc.errors import QccError

_WEIGHT_ONLY = re.compile(r"w(8|4)a16(?:-g([1-9][0-9]*))?(-sym|-asym)?")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    weight_format: str | None  # a qcc.dialects.formats key, None for float
    passes: tuple[str, ...]
    act_format: str | None = None  # a formats.activation key, None for float activations

    def to_json(self) -> dict:
        return {"name": self.name, "weight_format": self.weight_format, "act_format": self.act_format,
                "passes": list(self.passes)}


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    """A named recipe as data: formats, float-model passes before quantization, the weight quantizer,
    per-layer overrides ((pattern, weight format, activation format), as in a recipe file)."""

    weight_format: str
    act_format: str | None = None
    before: tuple[str, ...] = ()
    weight_pass: str = "quantize-weights"  # a pass taking {format=... exclude=...}
    weight_options: str = ""               # more options of each weight_pass instance
    overrides: tuple[tuple[str, str | None, str | None], ...] = ()


# int4 per-channel weights round with MSE-optimal clipping (QuaRot's RTN baseline clips too); for
# int8 the search finds nothing to clip, and grouped formats keep the format reference's plain rounding
_CLIP = "clip-search=20"
NAMED = {
    "w8a8": RecipeSpec("int8_sym_channel", "int8_sym_token"),
    "w8a8-static": RecipeSpec("int8_sym_channel", "int8_sym_tensor"),
    "w4a8-g128": RecipeSpec("int4_asym_g128", "int8_sym_token"),
    "w4a4": RecipeSpec("int4_sym_channel", "int4_sym_token", weight_options=_CLIP),
    "llm-int8": RecipeSpec("int8_sym_channel", "int8_sym_token", before=("split-outliers{threshold=6.0}",)),
    "llm-int8-dynamic": RecipeSpec("int8_sym_channel", "int8_sym_token",
                                   before=("split-outliers{threshold=6.0 decide=dynamic}",)),
}

# Recipes whose accuracy comes from passes that transform the float model first
# (rotation, channel reordering, smoothing, AWQ scaling, GPTQ).  Their passes
# are registered by their own modules; until one is, its recipe fails with a
# clear error naming the missing pass.  Add options to the pass texts here.
# reorder-channels' outlier parts ('<W>:outliers') in int8, as Atom keeps them
_OUTLIERS_INT8 = ((":outliers$", "int8_sym_channel", "int8_sym_token"),)
# int4 activations of rotated (Gaussian-like) rows: each row's scale maps 0.9 of its absmax to
# qmax (QuaRot's activation clipping ratio); not for unrotated rows, whose largest entries are
# the outlier channels clipping would cut
_ACT_CLIP = "int4_sym_token_clip0.9"
EXTENSIONS = {
    "w8a8-had": RecipeSpec("int8_sym_channel", "int8_sym_token", before=("fuse-rotation",)),
    "w4a4-had": RecipeSpec("int4_sym_channel", _ACT_CLIP, before=("fuse-rotation",), weight_options=_CLIP),
    "w4a4-reorder": RecipeSpec("int4_sym_channel", "int4_sym_token", before=("reorder-channels",),
                               weight_options=_CLIP, overrides=_OUTLIERS_INT8),
    "w4a4-had-reorder": RecipeSpec("int4_sym_channel", _ACT_CLIP, before=("fuse-rotation", "reorder-channels"),
                                   weight_options=_CLIP, overrides=_OUTLIERS_INT8),
    "w8a8-smooth": RecipeSpec("int8_sym_channel", "int8_sym_token", before=("smooth-channels",)),
    "w4a16-g128-awq": RecipeSpec("int4_asym_g128", before=("awq{format=int4_asym_g128}",)),
}
GPTQ_SUFFIX = "-gptq"

PRESETS = ("float", "w8a16", "w4a16-g128", *NAMED, *EXTENSIONS, "<preset>-gptq")

FILE_KEYS = ("name", "weight_format", "act_format", "weight_pass", "weight_options", "passes", "overrides")
OVERRIDE_KEYS = ("pattern", "weight_format", "act_format")


def get_recipe(name) -> Recipe:
    """The recipe for `name`: a preset name, a .json/.toml recipe file path, a dict, or a Recipe."""
    if isinstance(name, Recipe):
        return name
    if isinstance(name, dict):
        return recipe_from_dict(name, "quant")
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.endswith((".json", ".toml"))):
        return load_recipe_file(os.fspath(name))
    if name in (None, "", "float", "none"):
        return Recipe("float", None, ())
    if not isinstance(name, str):
        raise QccError(f"a recipe is a name, a recipe file path or a dict, not {type(name).__name__}",
                       where="--quant")
    base = name[: -len(GPTQ_SUFFIX)] if name.endswith(GPTQ_SUFFIX) else name
    if base in ("float", "none"):
        raise QccError(f"recipe '{name}': GPTQ rounds integer weights and '{base}' has none", where="--quant",
                       hint="add -gptq to a preset with integer weights, e.g. w4a16-g128-gptq or w8a8-had-gptq")
    spec = _preset_spec(base)
    if spec is None:
        raise QccError(f"unknown quantization recipe '{name}'", where="--quant",
                       hint=f"choose one of {', '.join(PRESETS)} (or w8a16-g<G>, w4a16-g<G>[-sym], "
                            f"or a .json recipe file)")
    if base != name:
        spec = dataclasses.replace(spec, weight_pass="gptq")
    return _from_spec(name, spec, where="--quant")


def _preset_spec(name: str) -> RecipeSpec | None:
    """The RecipeSpec of a preset name without the -gptq suffix, or None."""
    spec = NAMED.get(name) or EXTENSIONS.get(name)
    if spec is not None:
        return spec
    m = _WEIGHT_ONLY.fullmatch(name)
    if not m:
        return None
    bits, group, sym = m.group(1), m.group(2), m.group(3)
    symmetric = sym == "-sym" if sym else bits == "8"
    gran = f"g{group}" if group else "channel"
    return RecipeSpec(f"int{bits}_{'sym' if symmetric else 'asym'}_{gran}")


def _from_spec(name: str, spec: RecipeSpec, where: str) -> Recipe:
    passes = list(spec.before) + quantization_passes(spec.weight_format, spec.act_format, spec.overrides,
                                                     spec.weight_pass, spec.weight_options, _act_options(spec.before))
    for element in passes:
        _check_pass(element, where, f"recipe '{name}'")
    return Recipe(name, spec.weight_format, tuple(passes), spec.act_format)


def _check_pass(element: str, where: str, what: str) -> None:
    """QccError unless `element` names a registered qcc pass with valid options."""
    from qcc import passes as registry
    from qcc.pipeline import parse_element

    pass_name = element.partition("{")[0].strip()
    if registry.lookup(pass_name) is None:
        raise QccError(f"{what} needs pass '{pass_name}', which is not registered in this build", where=where,
                       hint=f"registered qcc passes: {', '.join(registry.all_passes())}")
    parse_element(element)  # option errors are QccErrors naming the pass and its options


def _act_options(before) -> str:
    """quantize-activations' options after the recipe's own passes: split-outliers{decide=dynamic}
    does not split the experts' products (their columns would be chosen per call), so their rows
    keep float activations (LLM.int8()'s outlier columns)."""
    return "experts=false" if any(p.partition("{")[0].strip() == "split-outliers" and "decide=dynamic" in p
                                  for p in before) else ""


def quantization_passes(weight_format: str | None, act_format: str | None, overrides=(),
                        weight_pass: str = "quantize-weights", weight_options: str = "",
                        act_options: str = "") -> list[str]:
    """quantize-weights / quantize-activations / dequant-after-gemm for the formats and per-layer overrides.

    overrides: [(pattern, weight_format, act_format)], first match wins; a layer
    matched by no pattern gets the recipe's formats.
    """
    patterns = [p for p, _, _ in overrides]

    def only(i: int) -> str:
        """exclude= regex keeping exactly the layers override i decides."""
        return f"^(?!.*(?:{patterns[i]}))" + "".join(f"|(?:{p})" for p in patterns[:i])

    rest = "|".join(f"(?:{p})" for p in patterns)

    def instance(pass_name: str, fmt: str, exclude: str, more: str = "") -> str:
        return f"{pass_name}{{format={fmt}{f' exclude={exclude}' if exclude else ''}{f' {more}' if more else ''}}}"

    weights = [instance(weight_pass, weight_format, rest, weight_options)] if weight_format else []
    acts = [instance("quantize-activations", act_format, rest, act_options)] if act_format else []
    for i, (_, wfmt, afmt) in enumerate(overrides):
        if wfmt:
            weights.append(instance(weight_pass, wfmt, only(i), weight_options))
        if afmt:
            acts.append(instance("quantize-activations", afmt, only(i), act_options))
    return weights + acts + (["dequant-after-gemm"] if acts else [])


def load_recipe_file(path: str) -> Recipe:
    if not os.path.isfile(path):
        raise QccError("recipe file not found", where=path)
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise QccError(f"cannot read recipe file: {e}", where=path)
    if not isinstance(data, dict):
        raise QccError(f"a recipe file holds an object with keys {', '.join(FILE_KEYS)}", where=path)
    data = dict(data)
    data.setdefault("name", os.path.basename(path))
    return recipe_from_dict(data, path)


def recipe_from_dict(data: dict, where: str) -> Recipe:
    """A Recipe from the recipe-file object (see the module docstring); QccError naming a bad field."""
    _check_keys(data, FILE_KEYS, where, "recipe")
    name = data.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise QccError("field 'name' must be a non-empty string", where=where)
    wfmt = _weight_format(data.get("weight_format", "none"), where, "weight_format")
    afmt = _act_format(data.get("act_format", "none"), where, "act_format")
    _check_combo(wfmt, afmt, where, "")
    before = data.get("passes", [])
    if not isinstance(before, list) or not all(isinstance(p, str) for p in before):
        raise QccError("field 'passes' must be a list of pass strings, e.g. [\"split-outliers{threshold=6.0}\"]",
                       where=where)
    for i, element in enumerate(before):
        _check_pass(element, where, f"passes[{i}]")
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list):
        raise QccError("field 'overrides' must be a list of objects", where=where)
    parsed = []
    for i, ov in enumerate(overrides):
        field = f"overrides[{i}]"
        if not isinstance(ov, dict):
            raise QccError(f"field '{field}' must be an object with keys {', '.join(OVERRIDE_KEYS)}", where=where)
        _check_keys(ov, OVERRIDE_KEYS, where, field)
        if "pattern" not in ov:
            raise QccError(f"field '{field}.pattern' is missing: a regex over weight names, e.g. \"lm_head\"",
                           where=where)
        pattern = _pattern(ov["pattern"], where, f"{field}.pattern")
        owfmt = _weight_format(ov.get("weight_format", wfmt or "none"), where, f"{field}.weight_format")
        oafmt = _act_format(ov.get("act_format", afmt or "none"), where, f"{field}.act_format")
        _check_combo(owfmt, oafmt, where, f"{field}.")
        parsed.append((pattern, owfmt, oafmt))
    weight_options = data.get("weight_options", "")
    if not isinstance(weight_options, str) or any(c in weight_options for c in "{}"):
        raise QccError("field 'weight_options' must be a string of the weight pass's options, "
                       "e.g. \"clip-search=20\"", where=where)
    passes = before + quantization_passes(wfmt, afmt, parsed, _weight_pass(data.get("weight_pass"), where),
                                          weight_options.strip(), _act_options(before))
    for element in passes:
        _check_pass(element, where, f"recipe '{name}'")
    return Recipe(name, wfmt, tuple(passes), afmt)


def _weight_pass(value, where: str) -> str:
    """The weight quantizer a file names: a registered pass with `exclude` and a weight `format` option."""
    import dataclasses as dc

    from qcc import passes as registry
    from qcc.dialects import formats

    def quantizes_weights(cls) -> bool:
        opts = {f.name: f for f in dc.fields(cls.Options)}
        if "exclude" not in opts or "format" not in opts:
            return False
        try:
            formats.parse_weight_format(opts["format"].default)
        except formats.FormatError:
            return False
        return True

    if value is None:
        return "quantize-weights"
    allowed = [name for name, cls in registry.all_passes().items() if quantizes_weights(cls)]
    if value not in allowed:
        raise QccError(f"field 'weight_pass': {value!r} is not a weight quantizer", where=where,
                       hint=f"allowed: {', '.join(allowed)}")
    return value


def _check_keys(obj: dict, allowed, where: str, what: str) -> None:
    for key in obj:
        if key not in allowed:
            raise QccError(f"unknown field '{key}' in {what}", where=where, hint=f"allowed: {', '.join(allowed)}")


def _weight_format(value, where: str, field: str) -> str | None:
    from qcc.dialects import formats

    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return formats.parse_weight_format(value).key()
    except formats.FormatError:
        raise QccError(f"field '{field}': unknown weight format {value!r}", where=where,
                       hint=f"allowed: none, {formats.KEY_GRAMMAR}, e.g. {', '.join(formats.list_formats()[:4])}")


def _act_format(value, where: str, field: str) -> str | None:
    from qcc.dialects.formats import FormatError, activation

    try:
        fmt = activation.parse_act_format(value) if value is not None else None
    except FormatError:
        raise QccError(f"field '{field}': unknown activation format {value!r}", where=where,
                       hint=f"allowed: none, {', '.join(activation.list_act_formats())}")
    return None if fmt is None else fmt.key()


def _check_combo(wfmt, afmt, where: str, prefix: str) -> None:
    if afmt is not None and wfmt is None:
        raise QccError(f"field '{prefix}act_format' is {afmt!r} but '{prefix}weight_format' is none: "
                       f"quantized activations need quantized weights (integer GEMM)", where=where,
                       hint="set a weight format, or act_format none")


def _pattern(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise QccError(f"field '{field}' must be a non-empty regex string", where=where)
    try:
        re.compile(value)
    except re.error as e:
        raise QccError(f"field '{field}': bad regex {value!r}: {e}", where=where)
    # it travels inside a pass option: no spaces, no characters the pipeline parser pairs up unevenly
    depth = {"(": 0, "[": 0, "{": 0}
    closers = {")": "(", "]": "[", "}": "{"}
    for ch in value:
        if ch in depth:
            depth[ch] += 1
        elif ch in closers:
            depth[closers[ch]] -= 1
    if any(c.isspace() for c in value) or "<" in value or ">" in value or any(depth.values()):
        raise QccError(f"field '{field}': pattern {value!r} cannot contain spaces, '<', '>' or unbalanced "
                       f"brackets", where=where, hint="use \\s for spaces, e.g. \"lm_head|layers\\.0\\.\"")
    return value
