"""Browser libraries that ship inside pinned Python wheels, served as static files.

Plotly's Python package carries the complete plotly.js bundle (`plotly/package_data/plotly.min.js`), so the charts
come from PyPI with everything else: `make up` needs no npm and no CDN, and the dashboard works offline. The finder
exposes exactly the files named here (not the package's other data) under `vendor/`, for runserver, whitenoise's
finders in DEBUG and `collectstatic` alike. htmx comes the same way, from django-htmx's own static folder.
"""

from importlib.util import find_spec
from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

# static path under STATIC_URL -> (Python package, file inside it)
VENDORED_FILES = {
    "vendor/plotly.min.js": ("plotly", "package_data/plotly.min.js"),
}


def _package_file(package: str, relative: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"{package} is not installed; run `make install`.")
    return Path(next(iter(spec.submodule_search_locations))) / relative


class VendoredPackageFinder(BaseFinder):
    def check(self, **kwargs):
        return []

    def find(self, path, find_all=False, **kwargs):
        if path not in VENDORED_FILES:
            return [] if find_all else None
        found = str(_package_file(*VENDORED_FILES[path]))
        return [found] if find_all else found

    def list(self, ignore_patterns):
        for static_path, (package, relative) in VENDORED_FILES.items():
            source = _package_file(package, relative)
            storage = FileSystemStorage(location=str(source.parent))
            # collectstatic copies storage.path(name) to the prefixed destination
            storage.prefix = str(Path(static_path).parent)
            yield source.name, storage
