"""Per-session work of the served viewer that Bokeh and Panel repeat for every visitor, done once or skipped.

Installed by the served app (`app.py`, `install()`); the tests check that what goes to the browser is what Bokeh
and Panel would send without it (tests/test_viewer.py). Measured in bench/README.md "Viewer: the session's
share of Bokeh and Panel, and fairness": at release scale a session's first document was ~105 ms of server CPU
(page HTML ~10, build ~70, serialization ~25; ~80 with these); 20 visitors arriving together wait for 20 of them
on the one event loop.

- `skip_unsent_defaults`: Bokeh serializes a model (`HasProps.query_properties_with_values` with
  `include_defaults=False`, the document and every patch sent over the WebSocket) by computing the value of
  every property, the defaults of the ~100 properties it does not send included (each default is copied and
  validated), and only then dropping those. The replacement drops them first. Its output is the same (a
  test compares a whole page's wire message with Bokeh's own): the properties sent are the ones set, the
  themed ones and the defaults already materialized, all decided before any value is computed, as in Bokeh;
  a required property without a value still raises. Serializing a session's first document: ~25 -> ~10 ms.
- `cache_immutable_defaults`: Bokeh computes a property's default (copy, then validation) every time an unset
  property is read, e.g. when a model is built and each property set (to compare with the old value). A default
  that is a plain immutable value (str, number, bool, None) of a class, not themed and not computed by a
  function, is the same every time; it is kept per (property, class). So is whether a property's default may
  change (`has_unstable_default`, asked on every read of a default), which depends on the class only.
- `cache_reused_page`: with `--reuse-sessions` every visitor's page HTML is rendered from the same reused
  session (Panel's `server_html_page_for_session`: the JavaScript bundle of its models, their stylesheets, the
  template), ~10 ms of CPU per visitor before the build of its session can start; only the visitor's token
  differs. The page is rendered once per reused session and the token swapped in; any other session's page
  (no reuse) is rendered as before.
"""

from __future__ import annotations

import bokeh
import panel as pn
from bokeh.core.has_props import HasProps
from bokeh.core.property.bases import Property
from bokeh.core.property.descriptors import PropertyDescriptor, UnsetValueError
from bokeh.core.property.singletons import Undefined
from bokeh.core.property.wrappers import PropertyValueContainer

_BOKEH_QUERY = HasProps.query_properties_with_values
_BOKEH_THEMED_DEFAULT = Property.themed_default
_BOKEH_HAS_UNSTABLE_DEFAULT = PropertyDescriptor.has_unstable_default
IMMUTABLE = (str, int, float, bool, type(None))


def _query_properties_with_values(self, query, *, include_defaults: bool = True, include_undefined: bool = False):
    """Bokeh's `HasProps.query_properties_with_values` (3.x), but with `include_defaults=False` the properties it
    would drop are dropped before their value is computed (see the module docstring)."""
    if include_defaults:
        return _BOKEH_QUERY(self, query, include_defaults=include_defaults, include_undefined=include_undefined)
    themed_keys: set[str] = set()
    selected = set(self._property_values) | set(self._unstable_default_values)
    themed_values = self.themed_values()
    if themed_values is not None:
        themed_keys = set(themed_values)
        selected |= themed_keys
    result = {}
    for key in self.properties(_with_props=True):
        descriptor = self.lookup(key)
        if key not in selected and getattr(descriptor.property, "_default", Undefined) is not Undefined:
            continue  # Bokeh computes this default and then drops it
        if not query(descriptor):
            continue
        try:
            value = descriptor.get_value(self)
        except UnsetValueError:
            if not include_undefined:
                raise
            value = Undefined
        else:
            if key not in selected:
                continue
            if key not in themed_keys and isinstance(value, PropertyValueContainer) and key in self._unstable_default_values:
                continue
        result[key] = value
    return result


_defaults: dict[tuple[int, type, str], tuple[Property, object]] = {}


def _themed_default(self, cls, name, theme_overrides, *, no_eval: bool = False):
    """Bokeh's `Property.themed_default`, kept per (property, class) when it is a plain immutable value."""
    if no_eval or (theme_overrides is not None and name in theme_overrides):
        return _BOKEH_THEMED_DEFAULT(self, cls, name, theme_overrides, no_eval=no_eval)
    hit = _defaults.get((id(self), cls, name))
    if hit is not None and hit[0] is self:
        return hit[1]
    value = _BOKEH_THEMED_DEFAULT(self, cls, name, theme_overrides, no_eval=no_eval)
    if type(value) in IMMUTABLE and not callable(self._default) and not callable(cls._overridden_defaults().get(name)):
        _defaults[(id(self), cls, name)] = (self, value)
    return value


_unstable: dict[tuple[int, type], tuple[PropertyDescriptor, bool]] = {}


def _has_unstable_default(self, obj) -> bool:
    """Bokeh's `PropertyDescriptor.has_unstable_default`, kept per (property, class): it depends on the property's
    type and default and on the class's overridden defaults only, and Bokeh asks it on every read of a default."""
    key = (id(self), type(obj))
    hit = _unstable.get(key)
    if hit is None or hit[0] is not self:
        hit = _unstable[key] = (self, _BOKEH_HAS_UNSTABLE_DEFAULT(self, obj))
    return hit[1]


def skip_unsent_defaults() -> None:
    HasProps.query_properties_with_values = _query_properties_with_values


def cache_immutable_defaults() -> None:
    Property.themed_default = _themed_default
    PropertyDescriptor.has_unstable_default = _has_unstable_default


_pages: dict[str, tuple[str, tuple, str]] = {}  # reused session id -> (token it was rendered with, inputs, page)


def cache_reused_page() -> None:
    from panel.io import server as panel_server

    render = getattr(panel_server, "_viewer_uncached_page", panel_server.server_html_page_for_session)
    panel_server._viewer_uncached_page = render

    def page(session, resources, title, token=None, template=None, template_variables=None):
        kwargs = {} if template is None else {"template": template}
        reused = token is not None and any(s is session for s in pn.state._sessions.values())
        if not reused:
            return render(session, resources, title, token=token, template_variables=template_variables, **kwargs)
        # What else the page depends on; a change renders it again.
        inputs = (
            title,
            id(template),
            repr(sorted((template_variables or {}).items())),
            resources.mode,
            resources.root_url,
            pn.config.theme,
            pn.config.global_loading_spinner,
            pn.config.loading_spinner,
        )
        hit = _pages.get(session.id)
        if hit is not None and hit[1] == inputs:
            return hit[2].replace(hit[0], token)
        html = render(session, resources, title, token=token, template_variables=template_variables, **kwargs)
        if html.count(token) == 1:  # the token appears once (the page's one render item); else never cached
            _pages[session.id] = (token, inputs, html)
        return html

    page.viewer_cached = True
    panel_server.server_html_page_for_session = page


# The Bokeh and Panel releases (major.minor) whose internals these replacements were checked against
# (tests/test_viewer.py compares the wire messages). On any other release `install` changes nothing and
# the app runs Bokeh's and Panel's own code, only slower; the test, which installs the replacements
# whatever the version, then tells whether they still send what Bokeh sends, before this list grows.
TESTED = {"bokeh": ("3.9",), "panel": ("1.9",)}


def tested(bokeh_version: str = bokeh.__version__, panel_version: str = pn.__version__) -> bool:
    minor = lambda v: ".".join(v.split(".")[:2])  # noqa: E731
    return minor(bokeh_version) in TESTED["bokeh"] and minor(panel_version) in TESTED["panel"]


def install() -> None:
    """All three, for this server process (the app runs it in every session: only the first call changes
    anything), on the TESTED releases of Bokeh and Panel only."""
    if tested():
        replace()


def replace() -> None:
    """The three replacements, whatever the versions (`install` checks them)."""
    from panel.io import server as panel_server

    skip_unsent_defaults()
    cache_immutable_defaults()
    if not getattr(panel_server.server_html_page_for_session, "viewer_cached", False):
        cache_reused_page()
