"""Calibration profiles: a marking threshold per (CFG branch, denoising step, layer), and what
they were made for. Files are JSON (``.json``) or TOML (``.toml``), written atomically and
validated on load.

A profile says what it was made for (model class, layer count, attention shapes, tile sizes,
step count and timesteps, CFG branches, budget, library version) and is refused, with the list of
what differs, where it does not fit. :meth:`Profile.resample` maps it to another step count
(approximately, see there).

Threshold semantics: the threshold of step t marks tiles during step t's call; they are skipped
from step t + 1 on. The last step's threshold therefore has no effect; calibration sets it to
-inf.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI, which the diffusers extra installs there
    import tomli as tomllib

from ..experiment import jsonable
from ..schedule import check_threshold, is_real
from ..state import ALLOWED_BLOCKS

FORMAT = "liteattention-profile"
FORMAT_VERSION = 1
TIMESTEP_TOLERANCE = 1e-3  # relative; timesteps of the same scheduler and step count agree exactly


class ProfileError(ValueError):
    """A profile file that cannot be read, or a profile that does not fit the run."""


def _version() -> str:
    from .. import __version__

    return __version__


@dataclass(frozen=True)
class Budget:
    """What calibration aims for; set any of the three (at least one).

    metric: per-call error against dense attention on the same inputs: 'rel_l2', 'cosine' or 'l1'
        (see ``calibration.tiles.METRICS``).
    max_error: bound on every attention call's error in ``metric``.
    min_psnr: bound (dB) on the PSNR of each final video against the dense video of the same
        prompt and seed; met by scaling the per-call bound.
    target_sparsity: mean fraction of tiles skipped (over steps, layers, branches and videos)
        to reach; the per-call bound is raised only as far as needed, never past the other bounds.
    """

    metric: str = "rel_l2"
    max_error: float | None = None
    min_psnr: float | None = None
    target_sparsity: float | None = None

    def __post_init__(self) -> None:
        from .tiles import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.max_error is None and self.min_psnr is None and self.target_sparsity is None:
            raise ValueError("budget: set max_error, min_psnr or target_sparsity (any or all)")
        bounds = {
            "max_error": ("a positive finite float", lambda x: 0 < x < math.inf),
            "min_psnr": ("a finite float (dB)", math.isfinite),
            "target_sparsity": ("a float in (0, 1)", lambda x: 0 < x < 1),
        }
        for name, (expected, ok) in bounds.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not (is_real(value) and ok(float(value))):
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
            object.__setattr__(self, name, float(value))  # numpy scalars become floats, as a file reads back


@dataclass(frozen=True)
class Profile:
    """Thresholds ``thresholds[branch][step][layer]`` (log2 units; -inf marks nothing) and the run
    they were calibrated for. Build with ``calibrate``; save with :meth:`save`; read with
    :func:`load_profile`; apply with ``apply_lite_attention(transformer, profile=...)``."""

    thresholds: tuple[tuple[tuple[float, ...], ...], ...]
    model: str  # class name of the transformer
    layer_names: tuple[str, ...]
    shapes: tuple[tuple[int, int, int, int], ...]  # per layer: (seq_q, seq_k, heads, head_dim)
    block_m: int
    block_n: int
    timesteps: tuple[float, ...] | None  # one per step, as the transformer received them; None: unchecked
    budget: Budget
    library_version: str = field(default_factory=_version)
    calibration: Mapping[str, Any] = field(default_factory=dict)  # how it was made and what it reached
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def branches(self) -> int:
        return len(self.thresholds)

    @property
    def steps(self) -> int:
        return len(self.thresholds[0])

    @property
    def layers(self) -> int:
        return len(self.layer_names)

    def threshold(self, branch: int, step: int, layer: int) -> float:
        return self.thresholds[branch][step][layer]

    def schedule(self, branch: int, layer: int) -> list[float]:
        """The thresholds of one (branch, layer), one per step."""
        return [row[layer] for row in self.thresholds[branch]]

    def step_function(self, branch: int, layer: int):
        """A callable ``step -> threshold`` for LiteAttention that refuses steps past the profile."""
        values = self.schedule(branch, layer)
        steps = self.steps

        def threshold(step: int) -> float:
            if step >= steps:
                raise ProfileError(
                    f"the profile was made for {steps} denoising steps; this generation reached step "
                    f"{step} (its step {step + 1}); calibrate for this step count or use profile.resample({step + 1}) "
                    "or more"
                )
            return values[step]

        return threshold

    # ---------------------------------------------------------------------------------------------
    # Fit checks
    # ---------------------------------------------------------------------------------------------

    def check(
        self,
        *,
        model: str | None = None,
        layers: int | None = None,
        steps: int | None = None,
        block_m: int | None = None,
        block_n: int | None = None,
        shapes: Mapping[int, tuple[int, int, int, int]] | None = None,
    ) -> None:
        """Raise a :class:`ProfileError` listing every given property that differs from the profile's."""
        wrong = []
        if model is not None and model != self.model:
            wrong.append(f"model {self.model} (this run: {model})")
        if layers is not None and layers != self.layers:
            wrong.append(f"{self.layers} self-attention layers (this run: {layers})")
        if steps is not None and steps != self.steps:
            wrong.append(f"{self.steps} steps (this run: {steps}; Profile.resample maps it, approximately)")
        if block_m is not None and block_m != self.block_m:
            wrong.append(f"block_m {self.block_m} (this run: {block_m})")
        if block_n is not None and block_n != self.block_n:
            wrong.append(f"block_n {self.block_n} (this run: {block_n})")
        for layer, shape in sorted((shapes or {}).items()):
            if tuple(shape) != self.shapes[layer]:
                wrong.append(
                    f"layer {layer} attention shape (seq_q, seq_k, heads, head_dim) {self.shapes[layer]} "
                    f"(this run: {tuple(shape)})"
                )
        if wrong:
            raise ProfileError("the profile does not fit this run: it was made for " + "; ".join(wrong))

    def check_call(self, layer: int | None, seq_q: int, seq_k: int, heads: int, head_dim: int) -> None:
        """Refuse an attention call whose shape differs from the profile's for that layer (``layer``
        None: from every layer's, for a block compiled once for all layers)."""
        shape = (seq_q, seq_k, heads, head_dim)
        # Element by element: under torch.compile the lengths can be symbolic, and dynamo cannot
        # compare tuples of them.
        layers = range(self.layers) if layer is None else (layer,)
        if any(all(a == b for a, b in zip(shape, self.shapes[i])) for i in layers):
            return
        if layer is not None:
            self.check(shapes={layer: shape})
        raise ProfileError(
            f"the profile does not fit this run: attention shape (seq_q, seq_k, heads, head_dim) {shape} is no "
            f"layer's of the profile ({', '.join(map(str, sorted(set(self.shapes))))})"
        )

    def check_timestep(self, step: int, timestep: float) -> None:
        """Refuse a generation whose timesteps differ from the profile's (another step count or
        scheduler)."""
        if step >= self.steps:
            raise ProfileError(
                f"the profile was made for {self.steps} denoising steps; this generation reached step {step}"
            )
        if self.timesteps is None:
            return
        expected = self.timesteps[step]
        if abs(timestep - expected) > TIMESTEP_TOLERANCE * max(1.0, abs(expected)):
            raise ProfileError(
                f"the profile was made for {self.steps} steps with timesteps {_short(self.timesteps)}; this "
                f"generation's step {step} has timestep {timestep:g} (the profile's: {expected:g}). "
                "Calibrate for this step count and scheduler, or use profile.resample(steps)"
            )

    # ---------------------------------------------------------------------------------------------
    # Derived profiles
    # ---------------------------------------------------------------------------------------------

    def resample(self, steps: int) -> Profile:
        """This profile mapped to ``steps`` denoising steps.

        Step i of the new schedule takes the thresholds of the old step at the same relative
        position, i * (old - 1) / (new - 1) rounded down (the stricter, earlier one); the last
        step stays -inf. The budget was met by the original profile on its calibration prompts,
        not by this one: more steps mark more often, so errors grow. Timesteps are not checked
        for a resampled profile. Calibrate again to have the budget hold.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        old = self.steps
        source = [0 if steps == 1 else (i * (old - 1)) // (steps - 1) for i in range(steps)]
        rows = []
        for branch in self.thresholds:
            new = [list(branch[min(s, old - 2) if old > 1 else 0]) for s in source]
            new[-1] = [-math.inf] * self.layers
            rows.append(tuple(tuple(r) for r in new))
        calibration = {**self.calibration, "resampled_from_steps": old}
        return replace(self, thresholds=tuple(rows), timesteps=None, calibration=calibration)

    # ---------------------------------------------------------------------------------------------
    # Files
    # ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The file contents (floats may be +-inf; JSON writing turns them into strings)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "created": self.created,
            "model": {"class": self.model, "layers": self.layers, "layer_names": list(self.layer_names),
                      "shapes": [list(s) for s in self.shapes]},
            "tiles": {"block_m": self.block_m, "block_n": self.block_n},
            "schedule": {
                "steps": self.steps,
                "branches": self.branches,
                "timesteps": None if self.timesteps is None else list(self.timesteps),
                "thresholds": [[list(row) for row in branch] for branch in self.thresholds],
            },
            "budget": asdict(self.budget),
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "profile") -> Profile:
        """Build and validate a profile from file contents; errors name ``source`` and the field."""
        def need(mapping: Any, key: str, where: str) -> Any:
            if not isinstance(mapping, Mapping) or key not in mapping:
                raise ProfileError(f"{source}: missing {where}{key}")
            return mapping[key]

        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ProfileError(f"{source}: not a LiteAttention profile (expected format = {FORMAT!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ProfileError(
                f"{source}: format_version {version!r} is not supported (this library reads {FORMAT_VERSION})"
            )
        model, tiles, schedule = (need(data, key, "") for key in ("model", "tiles", "schedule"))
        budget = dict(need(data, "budget", ""))
        timesteps = schedule.get("timesteps") if isinstance(schedule, Mapping) else None
        try:
            return cls(
                thresholds=_nested_floats(need(schedule, "thresholds", "schedule."), "schedule.thresholds"),
                model=need(model, "class", "model."),
                layer_names=tuple(need(model, "layer_names", "model.")),
                shapes=tuple(tuple(s) for s in need(model, "shapes", "model.")),
                block_m=need(tiles, "block_m", "tiles."),
                block_n=need(tiles, "block_n", "tiles."),
                timesteps=None if timesteps is None else tuple(_float(t, "schedule.timesteps") for t in timesteps),
                budget=Budget(**{k: v for k, v in budget.items() if v is not None}),
                library_version=str(data.get("library_version", "unknown")),
                calibration=dict(data.get("calibration", {})),
                created=str(data.get("created", "")),
            )._checked_counts(schedule, model, source)
        except ProfileError:
            raise
        except (TypeError, ValueError) as error:
            raise ProfileError(f"{source}: {error}") from error

    def _checked_counts(self, schedule: Mapping[str, Any], model: Mapping[str, Any], source: str) -> Profile:
        declared = {"schedule.steps": (schedule.get("steps"), self.steps),
                    "schedule.branches": (schedule.get("branches"), self.branches),
                    "model.layers": (model.get("layers"), self.layers)}
        for name, (stated, actual) in declared.items():
            if stated != actual:
                raise ProfileError(f"{source}: {name} says {stated!r} but the thresholds have {actual}")
        return self

    def save(self, path: str | Path) -> Path:
        """Write the profile to ``path`` (.json or .toml) atomically: a temporary file in the same
        folder, flushed, then renamed over the target."""
        path = Path(path)
        text = _dumps(self.to_dict(), _format_of(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a profile is an ordinary file
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def summary(self) -> str:
        """One line: what it was made for and its budget."""
        budget = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in asdict(self.budget).items() if v is not None)
        return (f"{self.model}, {self.layers} layers, {self.steps} steps, {self.branches} CFG branches, tiles "
                f"{self.block_m}x{self.block_n}; budget: {budget}")


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file (.json or .toml); a :class:`ProfileError` says what is wrong."""
    path = Path(path)
    fmt = _format_of(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError(f"{path}: cannot read the profile ({error.strerror or error})") from error
    try:
        data = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ProfileError(f"{path}: not valid {fmt.upper()} ({error})") from error
    return Profile.from_dict(data, source=str(path))


# -------------------------------------------------------------------------------------------------
# Validation helpers
# -------------------------------------------------------------------------------------------------


def _float(value: Any, name: str) -> float:
    if isinstance(value, str) and value in ("-inf", "inf", "nan"):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{name}: expected numbers, got {value!r}")
    return float(value)


def _nested_floats(values: Any, name: str) -> tuple[tuple[tuple[float, ...], ...], ...]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ProfileError(f"{name}: expected a [branch][step][layer] array")
    out = []
    for b, branch in enumerate(values):
        if not isinstance(branch, Sequence) or isinstance(branch, str):
            raise ProfileError(f"{name}[{b}]: expected a [step][layer] array")
        rows = []
        for s, row in enumerate(branch):
            if not isinstance(row, Sequence) or isinstance(row, str):
                raise ProfileError(f"{name}[{b}][{s}]: expected a list of thresholds, one per layer")
            rows.append(tuple(_float(t, f"{name}[{b}][{s}]") for t in row))
        out.append(tuple(rows))
    return tuple(out)


def _validate(profile: Profile) -> None:
    thresholds = profile.thresholds
    if not thresholds or not thresholds[0] or not thresholds[0][0]:
        raise ProfileError("thresholds: expected at least one branch, step and layer")
    steps, layers = len(thresholds[0]), len(profile.layer_names)
    for b, branch in enumerate(thresholds):
        if len(branch) != steps:
            raise ProfileError(f"thresholds[{b}]: expected {steps} steps (as branch 0), got {len(branch)}")
        for s, row in enumerate(branch):
            if len(row) != layers:
                raise ProfileError(f"thresholds[{b}][{s}]: expected {layers} layers (one per layer name), got {len(row)}")
            for t in row:
                try:
                    check_threshold(t, f"thresholds[{b}][{s}]")
                except (TypeError, ValueError) as error:
                    raise ProfileError(str(error)) from error
    if not isinstance(profile.model, str) or not profile.model:
        raise ProfileError(f"model: expected a class name, got {profile.model!r}")
    if len(profile.shapes) != layers or any(
        len(shape) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
        for shape in profile.shapes
    ):
        raise ProfileError(f"shapes: expected {layers} (seq_q, seq_k, heads, head_dim) positive int tuples")
    for name in ("block_m", "block_n"):
        if getattr(profile, name) not in ALLOWED_BLOCKS:
            raise ProfileError(f"{name}: expected one of {ALLOWED_BLOCKS}, got {getattr(profile, name)!r}")
    if profile.timesteps is not None and len(profile.timesteps) != steps:
        raise ProfileError(f"timesteps: expected {steps} (one per step), got {len(profile.timesteps)}")
    if not isinstance(profile.budget, Budget):
        raise ProfileError(f"budget: expected a Budget, got {type(profile.budget).__name__}")


def _short(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}{', ...' if len(values) > 4 else ''}]"


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ProfileError(f"{path}: expected a .json or .toml file name")
    return suffix[1:]


# -------------------------------------------------------------------------------------------------
# Writers
# -------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):  # numpy scalars too: their repr is not TOML
        value = float(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_table(data: Mapping[str, Any], prefix: str, lines: list[str]) -> None:
    tables = []
    for key, value in data.items():
        if value is None:  # TOML has no null: an absent key reads back as None
            continue
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(str(key))} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{prefix}.{json.dumps(str(key))}" if prefix else json.dumps(str(key))
        lines.append(f"\n[{name}]")
        _toml_table(value, name, lines)


def _dumps(data: Mapping[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(jsonable(data), indent=1) + "\n"
    lines: list[str] = []
    _toml_table(data, "", lines)
    return "\n".join(lines) + "\n"
