"""The plugin registry: one pluggy `PluginManager("dskd")`, built-ins and third parties loaded alike.

Built-in plugins are entry points of the `dskd` distribution itself (group `dskd`, one module each), so they go
through exactly the path a third-party package takes. `DSKD_LOAD_PLUGINS` (comma-separated distribution or
entry-point names) restricts which *third-party* entry points load; an empty value loads none. The built-ins
always load: without them no run could be configured.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from dskd import hookspecs
from dskd.errors import PluginError

FAMILIES = ("divergences", "aligners", "policies", "objectives")
SINGULAR = {"divergences": "divergence", "aligners": "aligner", "policies": "policy", "objectives": "objective"}
BUILTIN_DISTRIBUTION = "dskd"
LOAD_ENV = "DSKD_LOAD_PLUGINS"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


DECLARATIONS: dict[str, dict[str, Any]] = {
    "divergences": {"accepts_sparse_teacher": False, "option_ranges": {}},
    "aligners": {"default": False, "option_ranges": {}},
    "policies": {"default": False, "teacher_store": False, "multi_teacher": False, "option_ranges": {}},
    "objectives": {
        "needs_teacher": True,
        "default_aligner": "",
        "teacher_sft": False,
        "teacher_store_modes": ("hidden",),
        "multi_teacher": True,
        "option_ranges": {},
    },
}
"""What a registered factory (or divergence function) may declare as an attribute, with the value assumed when it
does not (docs/plugins.md explains each):

- divergence `accepts_sparse_teacher`: it takes a `SparseTeacher` (top-k + tail) in place of dense logits;
- aligner `default`: the aligner used across vocabularies when a job names none (built-in: eta);
- policy `default`: the policy of a job that names none, and of the teacher_sft stage (built-in: off_policy);
- policy `teacher_store`: a teacher store can serve it, because it distils on the dataset's own sequences only
  (built-in: off_policy; policies that sample from the student or the teacher need the live teacher);
- policy `multi_teacher`: it works with several teachers (`[[teachers]]`; built-in: off_policy, whose batches are the
  dataset's own sequences, which every teacher scores);
- objective `multi_teacher`: False for an objective that can learn from one teacher only (a job with several
  `[[teachers]]` is then refused); every built-in distillation objective takes several;
- objective `needs_teacher`: False for an objective without distillation parts (no teacher, no `kd_rate`);
- objective `default_aligner`: the aligner it uses when the job names none (uld: index, mined_kd: mined);
- objective `teacher_sft`: the objective the teacher_sft stage trains the teacher with (built-in: sft);
- objective `teacher_store_modes`: the teacher-store modes it can learn from ("hidden": last hidden states and the
  stored head, which give every teacher output exactly; "topk": top-k log-probabilities; kd declares both);
- any plugin `option_ranges`: `{option: (low, high)}`, inclusive, None for an open end; checked by validation.
"""


@dataclass(frozen=True)
class Registration:
    """One registered name: what it maps to and which plugin (and package) registered it."""

    family: str
    name: str
    obj: Any
    plugin: str
    package: str


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registry:
    """Names -> registered callables or factories, per family, with provenance."""

    divergences: dict[str, Any] = field(default_factory=dict)
    aligners: dict[str, Any] = field(default_factory=dict)
    policies: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, Any] = field(default_factory=dict)
    registrations: dict[tuple[str, str], Registration] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    def family(self, family: str) -> dict[str, Any]:
        return getattr(self, family)

    def get(self, family: str, name: str) -> Any:
        """The object registered as `name`, or a `PluginError` that lists the known names."""
        table = self.family(family)
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(
                f"unknown {SINGULAR[family]} {name!r}; known {family}: {known} "
                f"(install the package that provides it, or check `dskd plugins`)"
            )
        return table[name]

    def declared(self, family: str, name: str, key: str) -> Any:
        """What plugin `name` declares for `key` (see `DECLARATIONS`), or the value assumed when it is silent."""
        assumed = DECLARATIONS[family][key]  # a KeyError here is a bug in dskd: only declared keys are read
        return getattr(self.get(family, name), key, assumed)

    def default(self, family: str, key: str = "default") -> str:
        """The one plugin of `family` that declares `key = True` (e.g. the default policy)."""
        table = self.family(family)
        names = [name for name in sorted(table) if getattr(table[name], key, False) is True]
        if len(names) != 1:
            found = ", ".join(names) or "none is loaded"
            raise PluginError(
                f"dskd needs exactly one {SINGULAR[family]} that declares `{key} = True`, found {len(names)} ({found}); "
                f"name the {SINGULAR[family]} in the job, or check DSKD_LOAD_PLUGINS and `dskd plugins`"
            )
        return names[0]

    def describe(self) -> dict[str, Any]:
        """The JSON shape printed by `dskd plugins --json`."""
        out: dict[str, Any] = {family: sorted(self.family(family)) for family in FAMILIES}
        out["plugins"] = [
            {"name": p.name, "package": p.package, "version": p.version, "registered": p.registered}
            for p in self.plugins
        ]
        return out


def _entry_points() -> list[tuple[metadata.EntryPoint, str, str]]:
    """Entry points of group `dskd`, deduplicated, with their distribution name and version."""
    seen: set[tuple[str, str, str]] = set()
    found = []
    for dist in metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").strip()
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT:
                continue
            key = (dist_name.lower(), ep.name, ep.value)
            if key in seen:  # the same distribution can appear twice on sys.path (editable + build dirs)
                continue
            seen.add(key)
            found.append((ep, dist_name, dist.version or ""))
    # Built-ins first, then third parties, each in a stable order, so provenance and listings are reproducible.
    found.sort(key=lambda item: (item[1].lower() != BUILTIN_DISTRIBUTION, item[1].lower(), item[0].name))
    return found


def _allowed(ep_name: str, dist_name: str) -> bool:
    if dist_name.lower() == BUILTIN_DISTRIBUTION:
        return True
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return True
    wanted = {item.strip().lower() for item in raw.split(",") if item.strip()}
    return ep_name.lower() in wanted or dist_name.lower() in wanted


def unmatched_load_names() -> list[str]:
    """Names in DSKD_LOAD_PLUGINS that match no installed plugin (entry point or distribution): a typo or a
    package that is not installed, which would otherwise silently load nothing."""
    raw = os.environ.get(LOAD_ENV)
    if not raw:
        return []
    known = set()
    for ep, dist_name, _ in _entry_points():
        known.update((ep.name.lower(), dist_name.lower()))
    return [name for name in (item.strip() for item in raw.split(",")) if name and name.lower() not in known]


def make_plugin_manager(
    extra_plugins: Iterable[Any] = (), *, entry_points: bool = True
) -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    """A loaded and checked `PluginManager("dskd")`, plus plugin name -> (package, version)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str]] = {}
    if entry_points:
        for ep, dist_name, version in _entry_points():
            if not _allowed(ep.name, dist_name):
                continue
            if pm.get_plugin(ep.name) is not None:
                other = origin.get(ep.name, ("?", ""))[0]
                raise PluginError(
                    f"plugin name {ep.name!r} is provided by both {other!r} and {dist_name!r}; "
                    f"uninstall one, or restrict loading with {LOAD_ENV}"
                )
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party package must name itself, not crash deep inside
                raise PluginError(
                    f"plugin {ep.name!r} from package {dist_name!r} failed to load ({type(exc).__name__}: {exc}); "
                    f"fix or uninstall it, or restrict loading with {LOAD_ENV}"
                ) from exc
            _register(pm, plugin, ep.name)
            origin[ep.name] = (dist_name, version)
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        _register(pm, plugin, name)
        origin[name] = (getattr(plugin, "__module__", "") or "(in process)", "")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}; hooks are named dskd_register_<family> with family one of {', '.join(FAMILIES)}"
        ) from exc
    return pm, origin


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        # pluggy's message spans several lines; user errors are printed as one line
        raise PluginError(f"plugin {name!r} is invalid: {' '.join(str(exc).split())}") from exc
    except ValueError as exc:
        raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc


def load_registry(extra_plugins: Iterable[Any] = (), *, entry_points: bool = True) -> Registry:
    """Load every plugin and collect what each registers.

    `extra_plugins` are in-process plugin objects (modules or instances with `@dskd.hookimpl` methods),
    registered after the entry points; tests and notebooks use them instead of installing a package.
    """
    pm, origin = make_plugin_manager(extra_plugins, entry_points=entry_points)
    registry = Registry()
    infos: dict[str, PluginInfo] = {}
    for family in FAMILIES:
        hook = getattr(pm.hook, f"dskd_register_{family}")
        # Call each implementation on its own so every name is attributed to the plugin that registered it.
        for impl in reversed(hook.get_hookimpls()):
            plugin_name = impl.plugin_name
            package, version = origin.get(plugin_name, ("?", ""))
            info = infos.setdefault(plugin_name, PluginInfo(plugin_name, package, version))
            register = _make_register(registry, family, plugin_name, package, info)
            kwargs = {"register": register} if "register" in impl.argnames else {}
            try:
                impl.function(**kwargs)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin_name!r} ({package}) failed in dskd_register_{family}: {type(exc).__name__}: {exc}"
                ) from exc
    registry.plugins = sorted(
        infos.values(), key=lambda p: (p.package.lower() != BUILTIN_DISTRIBUTION, p.package, p.name)
    )
    return registry


def _make_register(
    registry: Registry, family: str, plugin: str, package: str, info: PluginInfo
) -> Callable[[str, Any], None]:
    def register(name: str, obj: Any) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin {plugin!r} registered the {SINGULAR[family]} name {name!r}; names are lowercase snake_case"
            )
        if not callable(obj):
            raise PluginError(f"plugin {plugin!r} registered {SINGULAR[family]} {name!r} with a non-callable {obj!r}")
        table = registry.family(family)
        if name in table:
            first = registry.registrations[(family, name)]
            raise PluginError(
                f"{SINGULAR[family]} {name!r} is registered twice: by plugin {first.plugin!r} ({first.package}) "
                f"and by plugin {plugin!r} ({package}); rename one of them"
            )
        table[name] = obj
        registry.registrations[(family, name)] = Registration(family, name, obj, plugin, package)
        info.registered.setdefault(family, []).append(name)

    return register


def option_defaults(obj: Callable[..., Any], *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """A plugin's options: the keyword parameters of its callable that have defaults, with those defaults.

    Positional parameters without defaults are the call's inputs (logits, tokenizers, the context) and are
    not options; `skip` removes names the engine passes itself (e.g. `temperature`).
    """
    skipped = set(skip)
    options = {}
    for param in inspect.signature(obj).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in skipped:
            continue
        if param.default is param.empty:
            continue
        options[param.name] = param.default
    return options
