"""Each inline <script> once per page.

Sphinx 7.4 adds an inline script that an extension registers after the builder started
(sphinx-thebe, sphinx-togglebutton do) twice: once as the builder's, once again from the
registry in ``prepare_writing`` (filename ``None`` there, ``''`` here, so the duplicate
check misses it). sphinx-thebe's script declares ``const THEBE_JS_URL``, so its second
copy throws "Identifier 'THEBE_JS_URL' has already been declared" on every page.
"""


def _key(js):
    return (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))


def scripts_once(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        key = _key(js) if hasattr(js, "attributes") else js
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique  # the builder restores its own list after each page


def setup(app):
    app.connect("html-page-context", scripts_once, priority=900)  # after every extension added its scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
